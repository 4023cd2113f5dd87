"""The figures pipeline of benchmarks/: what a benchmark writes (figures.py), the tables report.py makes from small
figures files (their cells are the files' numbers), the document blocks it rewrites or leaves pending, and the
plan of documented commands (no two of them share an output folder)."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import distill_probe  # noqa: E402
import eval_speed  # noqa: E402
import figures  # noqa: E402
import report  # noqa: E402
import retrieval_quality  # noqa: E402
import rq_converged  # noqa: E402
import train_throughput  # noqa: E402


def record(key: str, figures_: dict, config: dict | None = None, date: str = "2026-12-01T10:00:00+00:00") -> dict:
    """A figures file as the plan step ``key``'s command would write it."""
    step = report.STEPS[key]
    return {"format": figures.FORMAT, "benchmark": step.benchmark, "argv": step.argv, "command": step.command,
            "config": config or {}, "date": date, "figures": figures_,
            "machine": {"commit": "0123456789abcdef", "dirty": False, "cores": 2, "cores_usable": 2,
                        "torch_threads": 2, "load_average": [0.5, 0.4, 0.3]}}


def metrics(base: float) -> dict:
    """R@K figures whose six recalls add to rSum."""
    values = {k: base + i for i, k in enumerate(figures.RECALLS)}
    return {**values, "rsum": sum(values.values())}


EVAL_SPEED = {"num_images": 5000, "num_captions": 25000, "protocols": ["all", "fold5"], "gemm_s": 2.5,
              "protocol_s": 3.125, "ranking_ours_s": 0.25, "ranking_classic_s": 8.0, "protocol_over_gemm": 1.25,
              "classic_over_ours": 32.0, "same_recalls": True, "ranks_differing": {"i2t": 0, "t2i": 3}}


def quality_figures() -> dict:
    variants = {}
    for n, name in enumerate(("infonce", "vsepp", "user_uto_plain", "user_plain", "user_cge")):
        variants[name] = {"metrics": metrics(10.0 * n), "best_epoch": 2, "train_seconds": 60.0 * (n + 1),
                          "val_rsum_per_epoch": {"1": 100.0 + n, "2": 200.5 + n}, "overrides": []}
    return {"split": "val", "val_split": "val", "num_images": 250, "num_captions": 1250, "variants": variants,
            "teacher": {"checkpoint": "runs/clip_shapes", **metrics(40.0)}}


QUALITY_CONFIG = {"data": "runs/shapes_feats", "epochs": 8, "max_steps_per_epoch": None, "batch_size": 128, "seed": 0,
                  "text_encoder": "bigru"}


def write(folder: Path, key: str, data: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{key}.json").write_text(json.dumps(data))


def rows_of(markdown: str) -> list[list[str]]:
    """The cells of every table row (header and rule rows included) of a block."""
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("|")]


def tables_of(markdown: str) -> list[list[list[str]]]:
    """The rows of each table of a block, table by table."""
    return [rows_of(part) for part in markdown.split("\n\n") if part.startswith("|")]


def test_eval_speed_table_holds_the_files_numbers():
    text = eval_speed.render(record("eval_speed", EVAL_SPEED, {"dim": 1024}))
    rows = {row[0]: row[1] for row in rows_of(text)}
    assert rows["bare GEMM"] == "2.500 s" and rows["ranking alone, ours"] == "0.250 s"
    assert rows["ranking alone, classic per-query argsort loop"] == "8.000 s"
    assert rows["full protocol (all + fold5, GEMM included)"] == "3.125 s"
    assert "**1.25x**" in text and "**32.0x**" in text and "t2i 3" in text
    assert "```\npython benchmarks/eval_speed.py\n```" in text and "commit 0123456, 2026-12-01" in text


def test_quality_table_rows_differences_and_curves_come_from_the_file():
    data = record("rq_shapes", quality_figures(), QUALITY_CONFIG)
    text = retrieval_quality.render(data)
    recalls, curves = tables_of(text)
    by_name = {row[0]: row for row in recalls}
    for name, run in data["figures"]["variants"].items():
        row = by_name[retrieval_quality.LABELS.get(name, name)]
        expected = [f"{run['metrics'][k]:.2f}" for k in figures.RECALLS] + [f"{run['metrics']['rsum']:.2f}"]
        assert [cell.strip("*") for cell in row[1:8]] == expected
    assert by_name["user_cge (queues, CGE, no SGE)"][7] == "**255.00**"  # the best rSum, in bold
    assert by_name["infonce"][7] == "15.00"
    # one component at a time: differences of the rSums above (vsepp 75, user_uto_plain 135, user_plain 195)
    assert "UTO instead of the hinge (neither has SGE or queues): +60.0 rSum (user_uto_plain against vsepp)" in text
    assert "CGE, with queues: +60.0 rSum" in text
    assert "SGE, without queues" not in text  # user_noqueue was not run
    assert curves[0] == ["variant", "epoch 1", "epoch 2"] and ["vsepp", "101.0", "201.5"] in curves
    assert "rSum 255.00 (R@1 40.0 / 43.0)" in text  # the teacher's own figures


def test_write_replaces_blocks_with_figures_and_leaves_pending_ones(tmp_path):
    figures_dir = tmp_path / "figures"
    write(figures_dir, "eval_speed", record("eval_speed", EVAL_SPEED, {"dim": 1024}))
    write(figures_dir, "throughput_bigru", record("throughput_bigru", {}))  # its pair is missing: stays pending
    pending = "Old table, from the previous code, rerun pending:\n| a | 1.0 |"
    results = tmp_path / "results.md"
    results.write_text("# Figures\n<!-- figures:setup -->\n<!-- /figures:setup -->\n"
                       f"Prose 1.\n<!-- figures:eval_speed -->\nstale\n<!-- /figures:eval_speed -->\n"
                       f"Prose 2.\n<!-- figures:throughput -->\n{pending}\n<!-- /figures:throughput -->\nEnd.\n")
    readme = tmp_path / "README.md"
    readme.write_text("- <!-- figures:eval_speed:summary -->\nold\n<!-- /figures:eval_speed:summary -->\n")
    options = ["--figures", str(figures_dir), "--results", str(results), "--readme", str(readme)]
    assert report.main(options + ["--check"]) == 1
    assert report.main(options + ["--write"]) == 0
    assert report.main(options + ["--check"]) == 0
    text = results.read_text()
    assert text.startswith("# Figures\n<!-- figures:setup -->\n```\nxmcl data shapes --out runs/shapes")
    assert ("```\n<!-- /figures:setup -->\nProse 1.\n<!-- figures:eval_speed -->\n```\n"
            "python benchmarks/eval_speed.py") in text
    assert "stale" not in text and f"Prose 2.\n<!-- figures:throughput -->\n{pending}\n<!--" in text
    assert "the full protocol takes 1.25x the bare GEMM, and ranking is 32.0x faster" in readme.read_text()


def test_collect_finds_figures_files_by_their_documented_command(tmp_path):
    root, figures_dir = tmp_path / "runs", tmp_path / "figures"
    old = record("throughput_bert", {"n": 1}, date="2026-12-01T10:00:00+00:00")
    new = record("throughput_bert", {"n": 2}, date="2026-12-02T10:00:00+00:00")
    other = {**record("throughput_bert", {"n": 3}), "argv": ["--text-encoder", "bert", "--steps", "2"]}
    for folder, data in (("a", old), ("b", new), ("c", other)):
        (root / folder).mkdir(parents=True)
        (root / folder / "figures.json").write_text(json.dumps(data))
    assert report.collect(root, figures_dir) == ["throughput_bert"]
    assert report.load(figures_dir, "throughput_bert")["figures"] == {"n": 2}  # the newest documented one
    assert report.collect(root, figures_dir) == []  # nothing newer the second time


def test_benchmark_writes_its_configuration_machine_and_documented_command(tmp_path, monkeypatch):
    monkeypatch.setenv(figures.RUNS_ENV, str(tmp_path / "fresh"))
    args = eval_speed.parse_args(["--images", "10", "--seed", "3"])
    assert args.out.parent == tmp_path / "fresh" / "bench" / "eval_speed"  # default: under the moved runs root
    path = figures.write_figures(args.out, "eval_speed", args, {"x": 1.5},
                                 argv=["--images", "10", str(tmp_path / "fresh" / "a" / "b.pt")])
    data = json.loads(path.read_text())
    assert data["command"] == "python benchmarks/eval_speed.py --images 10 runs/a/b.pt"
    assert data["config"]["images"] == 10 and data["config"]["seed"] == 3 and data["figures"] == {"x": 1.5}
    machine = data["machine"]
    assert machine["cores"] >= 1 and machine["torch_threads"] >= 1 and len(machine["load_average"]) == 3
    assert machine["commit"] is None or len(machine["commit"]) == 40
    assert data["date"][:2] == "20" and report.documented(data) is None  # not a documented command


def parsed(step: report.Step):
    module = __import__(step.benchmark)
    return module.parse_args(step.argv)


@pytest.mark.parametrize("root", [None, "elsewhere"])
def test_documented_commands_never_share_an_output_folder(root, tmp_path, monkeypatch):
    if root:
        monkeypatch.setenv(figures.RUNS_ENV, str(tmp_path / root))
    outs = {step.key: parsed(step).out for step in report.PLAN if step.key}
    assert len(set(outs.values())) == len(outs), outs
    # the tolerance rules rerun st_slidr in a folder of their own, so its pretraining really runs again
    assert outs["distill_tolerance"] != outs["distill_probe"]
    # uto_margins reads the checkpoints the shapes harness writes
    harness = parsed(report.STEPS["rq_shapes"])
    for checkpoint in parsed(report.STEPS["uto_margins"]).checkpoints:
        assert checkpoint.parent.parent == harness.out and checkpoint.parent.name in harness.variants
    every_key = {key for block in report.BLOCKS + report.SUMMARIES for key in block.keys}
    assert every_key <= set(report.STEPS)


def test_the_committed_documents_match_their_figures_files():
    """docs/results.md and README.md hold exactly what report.py makes from docs/figures (no table by hand)."""
    assert report.main(["--check"]) == 0


def converged_figures() -> dict:
    config = {"model": {"region_dim": 1280, "region_pca_dim": 256, "embed_dim": 256, "head_hidden_dim": 128,
                        "queue_size": 2048, "momentum": 0.999},
              "optim": {"batch_size": 128, "epochs": 20, "lr": 5e-4, "lr_decay_epochs": [10]}}
    runs = {"infonce/seed0": {"metrics": metrics(10.0), "best_epoch": 19, "val_rsum_per_epoch": {}, "config": config},
            "infonce/seed1": {"metrics": metrics(12.0), "best_epoch": 20, "val_rsum_per_epoch": {}, "config": config},
            "user/seed0": {"stalled": "no gradient at the first step", "config": config},
            "user/seed1": {"metrics": metrics(20.0), "best_epoch": 17, "val_rsum_per_epoch": {}, "config": config,
                           "threads": 1}}
    summary = {"infonce": {"stalled_seeds": [], "rsum": {"mean": 87.0, "std": 8.49, "n": 2},
                           **{k: {"mean": 11.0 + i, "std": 1.41, "n": 2} for i, k in enumerate(figures.RECALLS)}},
               "user": {"stalled_seeds": [0], "rsum": {"mean": 135.0, "std": 0.0, "n": 1},
                        **{k: {"mean": 20.0 + i, "std": 0.0, "n": 1} for i, k in enumerate(figures.RECALLS)}}}
    return {"split": "val", "sweep": False, "runs": runs, "summary": summary, "kept_curves": "curves_seeds0-1.png"}


def test_converged_table_gives_mean_and_spread_per_variant_and_every_seed():
    text = rq_converged.render(record("rq_converged", converged_figures(), {"seeds": [0, 1]}))
    (rows,) = tables_of(text)
    by_name = {row[0]: row for row in rows}
    assert by_name["InfoNCE"][1:] == ["2", "11.0 ± 1.4", "12.0 ± 1.4", "13.0 ± 1.4", "14.0 ± 1.4", "15.0 ± 1.4",
                                      "16.0 ± 1.4", "87.00 ± 8.49"]
    assert by_name["USER (SGE, UTO, queues)"][1:3] == ["1", "20.0"]  # one finished seed: no spread shown
    assert "- user: seed 0: stalled at its first step; seed 1: 135.0 (best epoch 17, 1 thread)" in text
    assert "- infonce: seed 0: 75.0 (best epoch 19); seed 1: 87.0 (best epoch 20)" in text
    assert "a frozen 1280 → 256 PCA" in text and "20 epochs, lr 0.0005 × 0.1 at epoch 10" in text
    assert "![curves](figures/rq_converged_runs/curves_seeds0-1.png)" in text
    unkept = {**converged_figures(), "kept_curves": None}  # a run without --keep links no curves
    assert "![curves]" not in rq_converged.render(record("rq_converged", unkept, {"seeds": [0, 1]}))
    # the best variant (user, one seed finished) against InfoNCE, paired on seed 1 only: 135 - 87
    assert "- against InfoNCE: seed 1 +48.0 (mean +48.0, positive on 1 of 1 seeds; std over seeds 0.0 and 8.5)" in text
    assert "Its mean R@1: i2t 20.0 (target ≥ 33: not met), t2i 23.0 (target ≥ 24: not met)." in text
    line = rq_converged.summary(record("rq_converged", converged_figures(), {"seeds": [0, 1]}))
    assert "seeds 0-1" in line and "InfoNCE 87.0 ± 8.5, USER (SGE, UTO, queues) 135.0;" in line
    assert "the best, USER (SGE, UTO, queues), has R@1 20.0 / 23.0." in line
    retuned = rq_converged.summary(record("rq_converged", converged_figures(), {"seeds": [0, 1], "retune": True}))
    assert retuned.startswith("- `benchmarks/rq_converged.py --retune` (") and not line.startswith(retuned[:40])


def test_converged_retune_runs_the_sweeps_best_beside_the_baselines(tmp_path):
    for (gamma, mu), rsum in zip(rq_converged.SWEEP, (280.0, 285.0, 301.5, 290.0, 299.0, 287.0)):
        path = tmp_path / f"user_g{gamma}_mu{mu:g}" / "seed0.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"metrics": {"rsum": rsum}}), encoding="utf-8")
    args = rq_converged.parse_args(["--data", "feats", "--retune", "--keep", str(tmp_path), "--seeds", "0", "1"])
    runs = [(run.name, run.seed) for run in rq_converged.runs_to_do(args)]
    assert runs == [(name, seed) for name in ("infonce", "vsepp", "user", "user_g0.3_mu30", "user_tolerant_g0.3_mu30")
                    for seed in (0, 1)]
    tolerant = rq_converged.runs_to_do(args)[-1]
    assert tolerant.variant == "user_tolerant" and tolerant.overrides == ("loss.gamma=0.3", "loss.mu=30.0")
    assert rq_converged.label("user_g0.3_mu30") == "USER, UTO γ 0.3, μ 30"
    assert rq_converged.label("user_tolerant_g0.3_mu30") == "USER + tolerant queues, UTO γ 0.3, μ 30"
    # the point at the config's own gamma and mu is kept as user's seed 0, not under its sweep name
    (tmp_path / "user_g0.5_mu90" / "seed0.json").unlink()
    point = rq_converged.sweep_point(0.5, 90.0)
    twin = {"config": dataclasses.asdict(rq_converged.run_config(args, point)), "metrics": {"rsum": 310.0}}
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "seed0.json").write_text(json.dumps(twin), encoding="utf-8")
    assert rq_converged.best_sweep_point(args) == (0.5, 90.0)
    (tmp_path / "user" / "seed0.json").unlink()
    with pytest.raises(SystemExit, match="user_g0.5_mu90/seed0.json is missing"):
        rq_converged.runs_to_do(args)


def test_a_sweep_of_named_points_runs_them_and_keeps_its_own_curves():
    args = rq_converged.parse_args(["--data", "feats", "--sweep", "--points", "0.5:30", "0.7:30", "0.5:15"])
    runs = rq_converged.runs_to_do(args)
    assert [(run.name, run.seed) for run in runs] == [("user_g0.5_mu30", 0), ("user_g0.7_mu30", 0),
                                                     ("user_g0.5_mu15", 0)]
    assert runs[1].overrides == ("loss.gamma=0.7", "loss.mu=30.0")
    assert rq_converged.curves_name(args) == "curves_sweep_g0.5mu30_g0.7mu30_g0.5mu15.png"
    grid = rq_converged.parse_args(["--data", "feats", "--sweep"])
    assert len(rq_converged.runs_to_do(grid)) == 6 and rq_converged.curves_name(grid) == "curves_sweep.png"
    assert rq_converged.parse_args(argv=["--data", "feats", "--sweep", "--points", "0.7:30"]).out != grid.out
    for bad in (["--points", "0.7:30"], ["--sweep", "--points", "0.7"], ["--sweep", "--points", "0.7:0"]):
        with pytest.raises(SystemExit):
            rq_converged.parse_args(["--data", "feats", *bad])


def test_a_kept_run_of_the_same_configuration_is_found_under_another_name(tmp_path):
    base = {"loss": {"gamma": 0.5, "mu": 90.0, "batch_weight": 20.0}, "run": {"seed": 0, "amp": "none"},
            "data": {"path": "feats"}}
    kept = {"loss": {"gamma": 0.5, "mu": 90.0, "lambda_batch": 20.0}, "run": {"seed": 0},  # before "amp", and
            "data": {"path": "../feats"}}                                                # batch_weight's old name
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "seed0.json").write_text(json.dumps({"config": kept, "metrics": {"rsum": 1.0}}))
    assert rq_converged.kept_twin(tmp_path, base, base) == {"config": kept, "metrics": {"rsum": 1.0}}
    amp = {**base, "run": {"seed": 0, "amp": "bf16"}}  # the added field away from the config file's value
    gamma = {**base, "loss": {"gamma": 0.3, "mu": 90.0, "batch_weight": 20.0}}
    assert rq_converged.kept_twin(tmp_path, amp, base) is None and rq_converged.kept_twin(tmp_path, gamma, base) is None


def test_converged_estimate_rows_are_the_files_step_times_and_bounds():
    def estimate(scale):
        return {"estimate": {"gemm_gflops": 100.0, "threads": 2,
                             "user": {"seconds_per_step": 0.2 * scale, "steps": 4680, "run_minutes": 15.6 * scale,
                                      "step_gflop": 10.0 * scale, "flop_bound_seconds": 0.1 * scale}}}
    text = rq_converged.render_estimate(record("rq_converged_estimate", estimate(1)),
                                     record("rq_converged_estimate_1280", estimate(8)))
    (rows,) = tables_of(text)
    assert rows[2] == ["256-d (PCA)", "USER (SGE, UTO, queues)", "10.0", "0.100 s", "0.200 s", "2.0x", "16 min"]
    assert rows[3] == ["1280-d cells", "USER (SGE, UTO, queues)", "80.0", "0.800 s", "1.600 s", "2.0x", "125 min"]
    assert "Bare GEMM rate 100 GFLOP/s" in text


def test_flickr8k_throughput_rows_hold_step_times_flops_and_both_ratios():
    def figures_(scale):
        models = {name: {"label": label, "ms_per_step": ms * scale, "gflop_per_step": g, "samples_per_s": 1.0}
                  for name, label, ms, g in (("vsepp", "VSE++", 400.0, 190.0), ("infonce", "InfoNCE", 500.0, 188.0),
                                             ("user", "USER", 900.0, 349.0))}
        return {"models": models, "user_over": {"vsepp": 2.25, "infonce": 1.8},
                "user_over_flops": {"vsepp": 1.84, "infonce": 1.86}}
    config = {"batch_size": 128, "regions": 49, "region_dim": 1280, "queue_size": 2048, "embed_dim": 1024}
    two, one = record("throughput_f8k", figures_(1.0), config), record("throughput_f8k_1thread", figures_(1.5), config)
    one["machine"]["torch_threads"] = 1
    text = train_throughput.render_flickr8k(two, one)
    (rows,) = tables_of(text)
    assert rows[2] == ["2", "400 ms (190 GFLOP)", "500 ms (188 GFLOP)", "900 ms (349 GFLOP)", "1.80x", "1.86x"]
    assert rows[3][0] == "1" and rows[3][3] == "1350 ms (349 GFLOP)"
    assert "USER 1.50x" in text


def test_lanes_split_the_units_into_disjoint_interleaved_shares():
    assert figures.lane("2/3") == (2, 3) and figures.lane(" 1/1 ") == (1, 1)
    for bad in ("0/2", "3/2", "1", "a/b", "1/0"):
        with pytest.raises(Exception, match="K/N"):
            figures.lane(bad)
    shares = [[i for i in range(10) if figures.in_lane(i, (k, 3))] for k in (1, 2, 3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert all(figures.in_lane(i, None) for i in range(10))


def test_a_lane_works_in_the_folder_of_the_whole_command():
    argv = ["--data", "runs/f8k_feats", "--seeds", "0", "1", "2", "--keep", "kept"]
    assert rq_converged.parse_args(argv + ["--lane", "2/2"]).out == rq_converged.parse_args(argv).out
    assert rq_converged.parse_args(argv).out != rq_converged.parse_args(argv[:-2]).out
    argv = ["--methods", "slidr", "st_slidr"]
    assert distill_probe.parse_args(argv + ["--lane", "1/2"]).out == distill_probe.parse_args(argv).out


def test_distill_probe_lanes_share_the_runs_and_keep_reads_them_back(tmp_path, monkeypatch):
    """Two lanes run disjoint (seed, method) units; the collecting command then runs nothing and reads every
    result, from the kept copies alone once the output folder is gone."""
    calls = []

    def fake_pretrain(cfg, run_dir, resume):
        calls.append(("pretrain", run_dir.name))
        return run_dir / "last.pt"

    def fake_probe(cfg, checkpoint, run_dir, mode, label_fraction):
        calls.append(("probe", run_dir.name, cfg.probe.protocol))
        return {"miou": 0.1 * cfg.run.seed + (0.05 if checkpoint else 0.0), "miou_authors": 0.0, "iou": {"a": 0.5}}

    monkeypatch.setattr(distill_probe, "pretrain_distill", fake_pretrain)
    monkeypatch.setattr(distill_probe, "run_probe", fake_probe)
    out, keep = tmp_path / "out", tmp_path / "kept"
    common = ["--seeds", "0", "1", "--methods", "random", "slidr", "--probes", "ours", "--out", str(out),
              "--keep", str(keep)]
    for k in (1, 2):
        monkeypatch.setattr(sys, "argv", ["distill_probe.py", *common, "--lane", f"{k}/2"])
        distill_probe.main()
    # units in order (seed 0 random, seed 0 slidr, seed 1 random, seed 1 slidr): lane 1 has the random ones
    assert [c[1] for c in calls if c[0] == "probe"] == ["random_seed0", "random_seed1", "slidr_seed0", "slidr_seed1"]
    assert [c[1] for c in calls if c[0] == "pretrain"] == ["slidr_seed0", "slidr_seed1"]
    assert not (out / "figures.json").exists()  # a lane writes no figures
    assert sorted(p.relative_to(keep).as_posix() for p in keep.rglob("*.json")) == [
        f"{m}_seed{s}/result_ours.json" for m in ("random", "slidr") for s in (0, 1)]
    import shutil

    shutil.rmtree(out)
    calls.clear()
    monkeypatch.setattr(sys, "argv", ["distill_probe.py", *common])
    distill_probe.main()
    assert calls == []
    written = json.loads((out / "figures.json").read_text())["figures"]
    assert written["probes"]["ours"]["slidr"]["miou_per_seed"] == pytest.approx([5.0, 15.0])
    assert written["probes"]["ours"]["random"]["miou_per_seed"] == pytest.approx([0.0, 10.0])


def probe_method(per_seed: list[float], pole: float | None) -> dict:
    return {"miou_mean": sum(per_seed) / len(per_seed), "miou_std": 0.5, "miou_per_seed": per_seed,
            "iou_per_class": {"road": 90.0, "pole": pole}}


def test_probe_block_gives_each_probe_its_table_and_the_paired_difference():
    methods = {"slidr": probe_method([50.0, 52.0, 51.0], 3.0), "st_slidr": probe_method([51.5, 51.0, 53.0], None)}
    distill_config = {"loss": {"q": 0.01, "quantile_variant": "remove"}, "data": {"augment": True},
                      "voxel": {"coordinates": "cylindrical", "architecture": "unet", "widths": [32, 64],
                                "blocks": 1, "planes": [32]},
                      "image": {"backbone": "efficientnet_lite0", "weights": "imagenet"}}
    budget = {"pretrain_scenes": 48, "num_points": 8000, "steps": 300, "batch_scenes": 2, "probe_train_scenes": 16,
              "eval_scenes": 16, "linear_steps": 300}
    data = record("distill_probe", {"seeds": [0, 1, 2], "budget": budget,
                                    "probes": {"ours": methods, "authors": {"st_slidr": methods["st_slidr"]}}},
                  {"distill_config": distill_config})
    text = distill_probe.render(data)
    ours, ours_classes, authors, authors_classes = tables_of(text)
    assert ours[2] == ["SLidR", "51.0", "0.5", "50.0 / 52.0 / 51.0"]
    assert authors[2][0] == "ST-SLidR (tolerant + balancing)" and len(authors) == 3
    assert ours_classes[3] == ["ST-SLidR (tolerant + balancing)", "90.0", "-"]  # a class never present: no figure
    # differences by hand: +1.5, -1.0, +2.0; mean 0.83, sample std 1.61
    assert "ST-SLidR − SLidR, paired by seed: +1.5 / -1.0 / +2.0 (mean +0.8 ± 1.6, positive on 2 of 3 seeds)." in text
    assert text.count("paired by seed") == 1  # the authors' probe ran one method only
    assert "q = 0.01 (remove), cylindrical voxels" in text and "efficientnet_lite0 with imagenet weights" in text
    line = distill_probe.summary(data)
    assert "ours probe SLidR 51.0, ST-SLidR (tolerant + balancing) 51.8; authors probe" in line


def test_harness_records_the_trainers_curve_and_train_time_beside_the_best_figures(tmp_path, monkeypatch):
    """The record of a variant holds the best checkpoint's figures and, from the trainer's summary, the validation
    curve and the train time over every session (None for a run whose checkpoints predate it: not recorded)."""
    from xmcl.metrics.retrieval import Metrics

    def fake_train(cfg, run_dir):
        return {"best_epoch": 2, "val_rsum_by_epoch": {1: 12.5, 2: 14.0}, "train_seconds": 90.0}

    monkeypatch.setattr(retrieval_quality, "train_retrieval", fake_train)
    monkeypatch.setattr(retrieval_quality, "evaluate_checkpoint",
                        lambda checkpoint, *args: {"all": Metrics(1, 2, 3, 1, 1, 1, 2, 3, 1, 1, 12)}
                        if checkpoint == tmp_path / "run" / "best.pt" else None)
    record = retrieval_quality.train_and_score(None, tmp_path / "run", tmp_path, "val")
    assert record == {"metrics": Metrics(1, 2, 3, 1, 1, 1, 2, 3, 1, 1, 12).as_dict(), "best_epoch": 2,
                      "val_rsum_per_epoch": {1: 12.5, 2: 14.0}, "train_seconds": 90.0}
    assert retrieval_quality.train_minutes(record) == "1.5 min"
    assert retrieval_quality.train_minutes({"train_seconds": None}) == "not recorded"


def test_changed_paths_keep_their_first_letter_whatever_the_status_columns():
    assert figures.changed_paths(" M README.md\nM  src/xmcl/a.py\nMM docs/results.md\n") == [
        "README.md", "src/xmcl/a.py", "docs/results.md"]


def test_the_shipped_best_flickr8k_config_is_the_kept_best_runs_configuration():
    """configs/flickr8k_locked_tolerant.yaml, offered as the winner of the converged comparison, is the very
    configuration its kept runs trained with (the seed aside), and what the benchmark would run."""
    from xmcl.config import current_names, load_config
    from xmcl.retrieval.config import RetrievalTrainConfig

    root = BENCHMARKS.parent
    shipped = dataclasses.asdict(load_config(RetrievalTrainConfig, root / "configs/flickr8k_locked_tolerant.yaml", []))
    for seed in (0, 1, 2):
        kept = json.loads((root / f"docs/figures/rq_converged_runs/user_tolerant_g0.5_mu30/seed{seed}.json").read_text())
        ran = current_names(RetrievalTrainConfig, kept["config"])  # the keys renamed since, under their names now
        assert ran["run"]["seed"] == seed
        ran["run"]["seed"] = shipped["run"]["seed"]
        assert rq_converged.same_config(ran, shipped, shipped)  # keys added since at the file's values
        assert all(ran[section].keys() <= shipped[section].keys() for section in shipped)
    args = rq_converged.parse_args(["--data", shipped["data"]["path"], "--variants", "user_tolerant"])
    point = rq_converged.sweep_point(0.5, 30.0, "user_tolerant")
    assert dataclasses.asdict(rq_converged.run_config(args, point)) == shipped


def test_the_step_flop_count_takes_the_heads_accumulated_product():
    """``ProjectionHead.project`` adds its second product in place (``addmm_``), which torch's counter does not list:
    ``timing.gflop`` counts it as ``addmm``, so a head costs its three products, forward, by hand."""
    import torch

    from timing import gflop
    from xmcl.nn.heads import ProjectionHead

    head = ProjectionHead(12, 10, hidden_dim=6).eval()
    rows = torch.randn(7, 12)
    expected = 2 * 7 * (12 * 10 + 12 * 6 + 6 * 10)  # fc, W_1 (BN folded in), W_2
    with torch.no_grad():
        assert gflop(lambda: head.project(rows)) * 1e9 == pytest.approx(expected)


def test_the_step_flop_count_sees_the_key_towers_on_any_thread_count():
    """On 2 threads a USER step runs its key towers on a side thread, which a dispatch mode does not see; the count
    runs the step on one thread, so it is the same on 1 thread and on 2."""
    import torch

    from timing import gflop
    from xmcl.retrieval.config import RetrievalLossConfig
    from xmcl.retrieval.model import USERModel

    from helpers import VOCAB, model_config, region_batch

    model, batch, before = USERModel(model_config(), RetrievalLossConfig(), vocab_size=VOCAB).train(), region_batch(), \
        torch.get_num_threads()
    counts = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            counts.append(gflop(lambda: model(batch)["loss"].backward()))
    finally:
        torch.set_num_threads(before)
    assert counts[0] == counts[1] > 0

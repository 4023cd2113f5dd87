"""The shipped variants (configs/variants/*.yaml), composed onto the bases the benchmarks train them on, are the very
configurations the benchmarks built from their override lists before the files existed: so the runs kept from those
lists (rq_converged's kept results, found by configuration; the figures files of docs/figures) are still theirs."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import report  # noqa: E402
import retrieval_quality  # noqa: E402
import rq_converged  # noqa: E402

from xmcl.config import load_config  # noqa: E402
from xmcl.retrieval.config import RetrievalTrainConfig  # noqa: E402

USER = ["loss.name=uto", "model.sge=true", "model.use_queue=true", "loss.queue_false_negatives=mask"]
QUEUED = ["loss.name=uto", "model.use_queue=true", "loss.queue_false_negatives=mask"]
TOLERANT = ["loss.tolerance=quantile", "loss.tolerance_q=0.01", "loss.balance=true"]
INFONCE = ["loss.name=infonce", "model.sge=false", "model.use_queue=false"]
OVERRIDE_LISTS = {  # what each variant was, as the benchmarks wrote it out
    "infonce": INFONCE,
    "vsepp": ["loss.name=hinge", "model.sge=false", "model.use_queue=false"],
    "user_noqueue": ["loss.name=uto", "model.sge=true", "model.use_queue=false"],
    "user_keep": ["loss.name=uto", "model.sge=true", "model.use_queue=true", "loss.queue_false_negatives=keep"],
    "user": USER,
    "user_keys_train": USER + ["model.key_encoders_eval=false"],
    "user_uto_plain": ["loss.name=uto", "model.sge=false", "model.use_queue=false"],
    "user_plain": QUEUED + ["model.sge=false", "model.cge=false"],
    "user_cge": QUEUED + ["model.sge=false", "model.cge=true"],
    "user_sge_cge": QUEUED + ["model.sge=true", "model.cge=true"],
    "user_tolerant": USER + TOLERANT + ["loss.semantic_source=regions"],
    "user_cge_tolerant": QUEUED + ["model.sge=false", "model.cge=true"] + TOLERANT + ["loss.semantic_source=clip"],
    "user_authors": USER + ["model.key_modes=authors", "model.head_init=pytorch", "optim.decay_all_parameters=true"],
    "infonce_tolerant": INFONCE + TOLERANT + ["loss.semantic_source=regions"],
}


def test_the_shipped_variants_are_the_ones_the_benchmarks_had():
    assert sorted(retrieval_quality.VARIANTS) == sorted(OVERRIDE_LISTS)


@pytest.mark.filterwarnings("ignore:.*is now:FutureWarning")  # the lists spell keys renamed since by their old names
@pytest.mark.parametrize("base", [None, "flickr8k_locked", "shapes_user", "shapes_user_cge"])
@pytest.mark.parametrize("variant", sorted(OVERRIDE_LISTS))
def test_a_variant_file_on_a_base_is_its_override_list_on_that_base(variant: str, base: str | None):
    expected = load_config(RetrievalTrainConfig, base, OVERRIDE_LISTS[variant])
    assert retrieval_quality.variant_config(base, variant, []) == expected


@pytest.mark.parametrize("key", ["rq_shapes", "rq_f8k"])
@pytest.mark.filterwarnings("ignore:.*is now:FutureWarning")
def test_the_documented_quality_commands_train_the_configurations_they_trained(key: str):
    """Variant then budget, as now, against budget, variant list, ``--set``, as before."""
    args = retrieval_quality.parse_args(report.STEPS[key].argv)
    common = retrieval_quality.budget_overrides(args, 1280, 128 if args.clip_cache else None)
    budget = common[: len(common) - len(args.overrides)]
    for variant in args.variants:
        expected = load_config(RetrievalTrainConfig, None, budget + OVERRIDE_LISTS[variant] + args.overrides)
        assert retrieval_quality.variant_config(None, variant, common) == expected


@pytest.mark.filterwarnings("ignore:.*is now:FutureWarning")
def test_the_converged_runs_train_the_configurations_they_were_kept_with():
    """Every run of the seeds, the sweep and the retune, against ``--config`` + the options' budget + the variant's
    list + the run's own overrides + ``--set``, as before."""
    args = rq_converged.parse_args(["--data", "runs/f8k_feats", "--set", "run.threads=1"])
    budget = [f"data.path={args.data}", "run.seed=2", f"optim.epochs={args.epochs}",
              f"optim.lr_decay_epochs=[{args.decay_epoch}]"]
    runs = [rq_converged.Run(name, 2, name) for name in rq_converged.DEFAULT_VARIANTS]
    runs += [rq_converged.sweep_point(gamma, mu, variant, 2) for gamma, mu in rq_converged.SWEEP
             for variant in rq_converged.RETUNE_AT_BEST]
    for run in runs:
        expected = load_config(RetrievalTrainConfig, args.config,
                               budget + OVERRIDE_LISTS[run.variant] + list(run.overrides) + args.overrides)
        assert rq_converged.run_config(args, run) == expected

"""Where a trained model's positives and rank-1 failures sit relative to UTO's margin gamma.

UTO's negative term (1/mu) log(1 + sum_j exp(mu (s_j - gamma))) weighs a negative of score s_j by
exp(mu (s_j - gamma)): at mu = 90 it is below 0.011 once s_j < gamma - 0.05 and near 1 from gamma up. For each
checkpoint this measures, per direction on ``--split``: the mean score of each query's best positive and of its best
wrong candidate, the share of positives below gamma, the rank-1 failure rate (a wrong candidate scores above every
positive; exact ties, from identical captions of different images, are not counted), and where the winning wrong
candidate of the failures sits: under gamma - 0.05 (quiet: UTO hardly pushes it), in [gamma - 0.05, gamma), or at or
above gamma.

    python benchmarks/uto_margins.py runs/rq_shapes/user/best.pt runs/rq_shapes/vsepp/best.pt [--gamma 0.5]
        [--out runs/bench/uto_margins/<hash of the options>]

The figures of every checkpoint and direction go to OUT/figures.json, keyed by the checkpoint's run folder name
(``variant/seedS`` for a seed folder).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from figures import command_lines, options, parse_with_out, table, write_figures

from xmcl.retrieval.inference import embed_checkpoint

QUIET_BELOW = 0.05  # a negative this far under gamma gets < exp(-mu * 0.05) ~ 0.01 of UTO's gradient at mu = 90


def margin_report(scores: torch.Tensor, positive: torch.Tensor, gamma: float) -> dict[str, float]:
    """Figures (scores, or % of queries / of failures) for queries in rows of ``scores (Q, C)`` with boolean
    ``positive (Q, C)``, at least one positive per row; see the module docstring."""
    best_positive = scores.masked_fill(~positive, float("-inf")).amax(1)
    best_wrong = scores.masked_fill(positive, float("-inf")).amax(1)
    failed = best_wrong > best_positive
    winner = best_wrong[failed]

    def share_of_failures(mask: torch.Tensor) -> float:
        return mask.float().mean().item() * 100 if failed.any() else 0.0

    return {
        "positive_mean": best_positive.mean().item(),
        "wrong_mean": best_wrong.mean().item(),
        "positives_below_gamma": (best_positive < gamma).float().mean().item() * 100,
        "rank1_failures": failed.float().mean().item() * 100,
        "failures_quiet": share_of_failures(winner < gamma - QUIET_BELOW),
        "failures_band": share_of_failures((winner >= gamma - QUIET_BELOW) & (winner < gamma)),
        "failures_above": share_of_failures(winner >= gamma),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``, default the command line), ``out`` resolved."""
    parser = options(__doc__)
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--split", default="val")
    parser.add_argument("--gamma", type=float, default=None, help="margin to test against (default: each run's)")
    parser.add_argument("--device", default="cpu")
    return parse_with_out(parser, "uto_margins", argv=argv)


def run_name(checkpoint: Path) -> str:
    """The run folder's name, with its parent's for a seed folder (``user/seed0``, as ``rq_converged.py`` lays runs
    out), so that runs of several variants stay apart."""
    folder = checkpoint.parent
    return f"{folder.parent.name}/{folder.name}" if folder.name.startswith("seed") else folder.name


def render(d: dict) -> str:
    """The block of docs/results.md: one row per run and direction."""
    f = d["figures"]
    rows = []
    for name, run in f["runs"].items():
        for direction in ("i2t", "t2i"):
            r = run[direction]
            rows.append([name, run["loss"], direction, f"{r['positive_mean']:.3f}", f"{r['wrong_mean']:.3f}",
                         *(f"{r[k]:.1f}%" for k in ("positives_below_gamma", "rank1_failures", "failures_quiet",
                                                   "failures_band", "failures_above"))])
    gamma = next(iter(f["runs"].values()))["gamma"]
    q = f["quiet_below"]
    return (f"{command_lines(d)}\n\nShapes {f['split']}, γ = {gamma}:\n\n"
            + table(["run", "loss", "dir", "best positive (mean)", "best wrong (mean)", "positives < γ",
                     "R@1 failures", f"winner < γ−{q}", f"winner in [γ−{q}, γ)", "winner ≥ γ"], rows))


def main() -> None:
    args = parse_args()
    runs = {}
    for checkpoint in args.checkpoints:
        images, texts, split, cfg = embed_checkpoint(checkpoint, None, args.split, args.device)
        scores = (images @ texts.T).cpu()
        caption_image = torch.as_tensor(split.caption_image)
        own = caption_image[None, :] == torch.arange(scores.size(0))[:, None]
        gamma = args.gamma if args.gamma is not None else cfg.loss.gamma
        run = runs.setdefault(run_name(checkpoint), {"checkpoint": checkpoint, "gamma": gamma, "loss": cfg.loss.name})
        for direction, s, positive in (("i2t", scores, own), ("t2i", scores.T, own.T)):
            run[direction] = margin_report(s, positive, gamma)
    write_figures(args.out, "uto_margins", args, {"split": args.split, "quiet_below": QUIET_BELOW, "runs": runs},
                  show=render)


if __name__ == "__main__":
    main()

"""The towers' float32 products on this CPU: torch's default (MKL's sgemm, behind ``addmm`` and ``mm``) against
oneDNN's kernels, which ``xmcl.nn.dense`` uses, in the three forms a training step runs them.

- forward ``x W^T + b`` (``x (rows, k)``, ``W (n, k)``);
- input gradient ``dy W`` (``dy (rows, n)``);
- weight gradient ``dy^T x`` (a long reduction over the rows; ``nn.dense`` leaves it to MKL).

The shapes are the locked USER step's (128 images x 49 cells = 6272 rows: SGE's and the head's 256 -> 256, the MLP's
256 -> 128 and 128 -> 256) and a 1024^3 product. Both libraries take turns call by call, so a change in what else
runs on the cores falls on both; the figure is each one's median and their GFLOP/s.

  python benchmarks/dense_products.py                 # the step's threads (2 on this machine)
  python benchmarks/dense_products.py --threads 1
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "3000")  # as the command line sets it, before torch loads OpenMP

import statistics  # noqa: E402

import torch  # noqa: E402
from figures import options, parse_with_out, write_figures  # noqa: E402
from timing import interleaved_seconds  # noqa: E402

from xmcl.nn.dense import KERNEL_AVAILABLE, onednn_product  # noqa: E402

SETTLING = 3  # calls of each product left out of its median, after the warm-up round
SHAPES = [(6272, 256, 256), (6272, 256, 128), (6272, 128, 256), (1024, 1024, 1024)]  # (rows, k, n)


def forms(rows: int, k: int, n: int) -> dict[str, tuple[int, dict]]:
    """Each form's FLOP and its two implementations (MKL, oneDNN) on random operands."""
    x, weight, bias, grad = torch.randn(rows, k), torch.randn(n, k), torch.randn(n), torch.randn(rows, n)
    flop = 2 * rows * k * n
    return {"forward": (flop, {"mkl": lambda: torch.addmm(bias, x, weight.t()),
                               "onednn": lambda: onednn_product(x, weight, bias)}),
            "input_gradient": (flop, {"mkl": lambda: grad.mm(weight),
                                      "onednn": lambda: onednn_product(grad, weight.t(), None)}),
            "weight_gradient": (flop, {"mkl": lambda: grad.t().mm(x),
                                       "onednn": lambda: onednn_product(grad.t(), x.t(), None)})}


def main() -> None:
    parser = options(__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parse_with_out(parser, "dense_products", naming=["threads"])
    if args.repeats <= SETTLING:
        parser.error(f"--repeats must exceed the {SETTLING} settling calls left out of the medians")
    if not KERNEL_AVAILABLE:
        raise SystemExit("this torch has no oneDNN linear kernel (mkldnn::_linear_pointwise)")
    torch.set_num_threads(args.threads)
    figures = {}
    for rows, k, n in SHAPES:
        for form, (flop, impls) in forms(rows, k, n).items():
            names = list(impls)
            spent = interleaved_seconds([impls[name] for name in names], args.repeats)
            medians = {name: statistics.median(seconds[SETTLING:]) for name, seconds in zip(names, spent)}
            figures[f"{rows}x{k}x{n} {form}"] = {
                **{f"{name}_ms": 1000 * medians[name] for name in names},
                **{f"{name}_gflops": flop / medians[name] / 1e9 for name in names}}
    write_figures(args.out, "dense_products", args, figures, show=render)


def render(record: dict) -> str:
    rows = ["| product (rows x k x n) | form | MKL ms | oneDNN ms | MKL GFLOP/s | oneDNN GFLOP/s |",
            "| --- | --- | --- | --- | --- | --- |"]
    for key, f in record["figures"].items():
        shape, form = key.split(" ")
        rows.append(f"| {shape} | {form.replace('_', ' ')} | {f['mkl_ms']:.2f} | {f['onednn_ms']:.2f} | "
                    f"{f['mkl_gflops']:.0f} | {f['onednn_gflops']:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()

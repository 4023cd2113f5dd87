"""The ``xmcl`` command line: each command parses its options and delegates; no logic lives here."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from xmcl.errors import XmclError

PathArg = click.Path(path_type=Path)


class _Group(click.Group):
    """A group whose commands turn an ``XmclError`` into one clear line and exit status 2."""

    def invoke(self, ctx: click.Context):  # noqa: D401 - click API
        try:
            return super().invoke(ctx)
        except XmclError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="xmcl")
def main() -> None:
    """xmcl: cross-modal contrastive learning (USER retrieval, ST-SLidR distillation)."""


# ----------------------------------------------------------------------------------------- data
@main.group(cls=_Group)
def data() -> None:
    """Built-in data sets."""


@data.command("shapes")
@click.option("--out", type=PathArg, required=True, help="Folder to write the corpus to (Karpathy layout).")
@click.option("--images", type=int, default=2000, show_default=True, help="Number of images.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=int, default=96, show_default=True, help="Image side in pixels (64-128).")
def data_shapes(out: Path, images: int, seed: int, size: int) -> None:
    """Generate the shapes-world image-caption corpus."""
    from xmcl.data.shapes import generate_shapes_world

    world = generate_shapes_world(out, num_images=images, seed=seed, image_size=size)
    click.echo(f"wrote {world.json_path} ({world.split_sizes})")


# ------------------------------------------------------------------------------------- features
@main.command()
@click.option("--data", "data_path", type=PathArg, required=True, help="Corpus folder or Karpathy JSON.")
@click.option("--split", "splits", multiple=True, default=("train", "val"), show_default=True)
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option("--backbone-weights", default="imagenet", show_default=True,
              help="'imagenet' (packaged EfficientNet-Lite0 weights), a local state-dict path, or 'none'.")
@click.option("--image-size", type=int, default=224, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=PathArg, required=True, help="Folder for {split}_ims.npy / _caps.txt / _ids.txt.")
def features(data_path: Path, splits: tuple[str, ...], backbone: str, backbone_weights: str, image_size: int,
             batch_size: int, device: str, out: Path) -> None:
    """Extract the grid features of a frozen backbone once (float16, memory-mapped, resumable)."""
    from xmcl.retrieval.grid_features import extract_corpus_features

    for path in extract_corpus_features(data_path, splits, backbone, backbone_weights, out,
                                        image_size=image_size, batch_size=batch_size, device=device):
        click.echo(f"wrote {path}")


# ---------------------------------------------------------------------------------------- train
@main.command()
@click.option("--config", "config_path", type=PathArg, required=True, help="YAML config (see configs/).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value.")
@click.option("--out", type=PathArg, required=True, help="Run folder (checkpoints, log, curves).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from OUT/last.pt when it exists.")
def train(config_path: Path, overrides: tuple[str, ...], out: Path, resume: bool) -> None:
    """Train a retrieval model (USER or a baseline)."""
    from xmcl.config import load_config
    from xmcl.training.retrieval import RetrievalTrainConfig, train_retrieval

    cfg = load_config(RetrievalTrainConfig, config_path, overrides)
    summary = train_retrieval(cfg, out, resume=resume)
    click.echo(f"best val rSum {summary['best_rsum']:.2f} at epoch {summary['best_epoch']}; "
               f"checkpoints in {out}")


# ------------------------------------------------------------------------------------- evaluate
@main.command()
@click.option("--checkpoint", type=PathArg, required=True)
@click.option("--data", "data_path", type=PathArg, default=None,
              help="Corpus to evaluate on (default: the one the model was trained on).")
@click.option("--split", default="val", show_default=True)
@click.option("--protocol", "protocols", multiple=True, type=click.Choice(["all", "fold5"]), default=("all",),
              show_default=True, help="'all' = whole split (Flickr 1K, COCO 5K); 'fold5' = COCO 1K.")
@click.option("--out", type=PathArg, default=None, help="Write the metrics as JSON here.")
@click.option("--device", default="auto", show_default=True)
def evaluate(checkpoint: Path, data_path: Path | None, split: str, protocols: tuple[str, ...], out: Path | None,
             device: str) -> None:
    """Evaluate a trained model: R@1/5/10 both directions, median/mean rank, rSum."""
    from xmcl.evaluation import format_table, save_json
    from xmcl.training.retrieval import evaluate_checkpoint

    results = evaluate_checkpoint(checkpoint, data_path, split, protocols, device=device)
    click.echo(format_table(results))
    if out is not None:
        save_json(results, out)
        click.echo(f"wrote {out}")


# ----------------------------------------------------------------------------------------- demo
@main.command()
@click.option("--out", type=PathArg, default=Path("runs/demo"), show_default=True)
@click.option("--images", type=int, default=1500, show_default=True, help="Shapes-world images to generate.")
@click.option("--epochs", type=int, default=None, help="Override the demo config's epochs.")
def demo(out: Path, images: int, epochs: int | None) -> None:
    """Generate the shapes world, train USER and the VSE++ baseline on it, print their recall side by side."""
    from xmcl.demo import run_demo

    click.echo(run_demo(out, num_images=images, epochs=epochs))


if __name__ == "__main__":
    main()

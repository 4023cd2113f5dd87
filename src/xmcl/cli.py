"""The ``xmcl`` command line: each command parses its options and delegates; no logic lives here.

Exit status: 0 when the command did its work; an ``XmclError`` is printed as one line (``error: ...``) and exits
with its ``exit_code``: 130 for ``RunInterrupted`` (a training run stopped by SIGINT or SIGTERM after saving its
checkpoint), 2 for every other error. Option errors are click's usage errors (2); a ``KeyboardInterrupt`` that no run
catches (Ctrl-C in another command, or a second Ctrl-C during a run) is click's ``Aborted!`` (1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from xmcl.errors import XmclError

PathArg = click.Path(path_type=Path)
Positive = click.IntRange(min=1)
OVERWRITE = click.option("--overwrite", is_flag=True, help="Delete the run already in OUT (checkpoints, log, "
                         "config) and start over; implies --no-resume.")
MODEL_HELP = "A training checkpoint (best.pt), a model directory (`xmcl export`) or a shipped model's name."
TEXT_MODEL_OPTION = click.option("--text-model", default=None,
                                 help="Where the frozen text model of a locked-text model is now (a directory).")
RUNTIME_OPTION = click.option("--runtime", type=click.Choice(["torch", "onnx", "onnx-int8"]), default="torch",
                              show_default=True, help="onnx / onnx-int8: the ONNX graphs of a model directory "
                              "exported with --onnx (--quantize int8), under ONNX Runtime.")


class _Group(click.Group):
    """A group whose commands turn an ``XmclError`` into one clear line and its exit status (2; 130 for an
    interrupted run)."""

    def invoke(self, ctx: click.Context):  # noqa: D401 - click API
        try:
            return super().invoke(ctx)
        except XmclError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)


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
@click.option("--images", type=Positive, default=2000, show_default=True, help="Number of images.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--size", type=click.IntRange(64, 128), default=96, show_default=True, help="Image side in pixels.")
@click.option("--overwrite", is_flag=True, help="Replace a corpus already in OUT (once the new one is complete).")
def data_shapes(out: Path, images: int, seed: int, size: int, overwrite: bool) -> None:
    """Generate the shapes-world image-caption corpus."""
    from xmcl.data.shapes import generate_shapes_world

    world = generate_shapes_world(out, num_images=images, seed=seed, image_size=size, overwrite=overwrite)
    click.echo(f"wrote {world.json_path} ({world.split_sizes})")


# ------------------------------------------------------------------------------------- features
@main.command()
@click.option("--data", "data_path", type=PathArg, required=True, help="Corpus folder or Karpathy JSON.")
@click.option("--split", "splits", multiple=True, default=("train", "val"), show_default=True)
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option("--backbone-weights", default="imagenet", show_default=True,
              help="'imagenet' (packaged EfficientNet-Lite0 weights), a local state-dict path, or 'none'.")
@click.option("--image-size", type=click.IntRange(min=16), default=224, show_default=True)
@click.option("--batch-size", type=Positive, default=32, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=PathArg, required=True, help="Folder for {split}_ims.npy / _caps.txt / _ids.txt.")
@click.option("--skip-unreadable", is_flag=True, help="Leave out images that cannot be decoded (and their "
              "captions), listed in OUT/{split}_unreadable.txt, instead of failing.")
@click.option("--text", "with_text", is_flag=True, help="Also cache a frozen text model's token features "
              "(OUT/{split}_text_ims.npy + text_features.json; for model.text_input=token_features).")
@click.option("--text-only", is_flag=True, help="Cache only the token features (e.g. beside grid features already "
              "in OUT; give --data the features folder or the raw corpus).")
@click.option("--text-model", default=None, help="A local BERT-family directory (default: the installed MiniLM).")
def features(data_path: Path, splits: tuple[str, ...], backbone: str, backbone_weights: str, image_size: int,
             batch_size: int, device: str, out: Path, skip_unreadable: bool, with_text: bool, text_only: bool,
             text_model: str | None) -> None:
    """Extract the grid features of a frozen backbone once (float16, memory-mapped, resumable); with --text /
    --text-only, a frozen text model's token features too."""
    from xmcl.retrieval.grid_features import extract_corpus_features
    from xmcl.retrieval.token_features import extract_corpus_token_features

    paths = [] if text_only else extract_corpus_features(data_path, splits, backbone, backbone_weights, out,
                                                          image_size=image_size, batch_size=batch_size,
                                                          device=device, skip_unreadable=skip_unreadable)
    if with_text or text_only:  # from the features just written, so captions match the image rows
        paths += extract_corpus_token_features(data_path if text_only else out, splits, text_model, out,
                                               batch_size=batch_size, device=device)
    for path in paths:
        click.echo(f"wrote {path}")


# ---------------------------------------------------------------------------------------- train
@main.command()
@click.option("--config", "config_path", type=PathArg, required=True, help="YAML config (see configs/).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value.")
@click.option("--out", type=PathArg, required=True, help="Run folder (checkpoints, log, curves).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from OUT/last.pt when it exists.")
@OVERWRITE
def train(config_path: Path, overrides: tuple[str, ...], out: Path, resume: bool, overwrite: bool) -> None:
    """Train a retrieval model (USER or a baseline)."""
    from xmcl.config import load_config
    from xmcl.retrieval.config import RetrievalTrainConfig
    from xmcl.runtime.distributed import is_main_process
    from xmcl.training.retrieval_trainer import train_retrieval

    cfg = load_config(RetrievalTrainConfig, config_path, overrides)
    summary = train_retrieval(cfg, out, resume=resume, overwrite=overwrite)
    if is_main_process():  # once per job under torchrun
        click.echo(f"best val rSum {summary['best_rsum']:.2f} at epoch {summary['best_epoch']}; "
               f"checkpoints in {out}")


# ------------------------------------------------------------------------------------------ CLIP
@main.command("clip-cache")
@click.option("--clip", "clip_path", type=PathArg, required=True,
              help="Frozen CLIP: a transformers directory or an OpenAI / open_clip .pt file.")
@click.option("--data", "data_path", type=PathArg, required=True, help="Corpus folder or Karpathy JSON (raw images).")
@click.option("--split", "splits", multiple=True, default=("train", "val"), show_default=True)
@click.option("--out", type=PathArg, required=True, help="Cache folder (set model.clip_cache to it).")
@click.option("--batch-size", type=Positive, default=64, show_default=True)
@click.option("--shard-size", type=Positive, default=1024, show_default=True, help="Rows per .npy shard (resume unit).")
@click.option("--activation", type=click.Choice(["quick_gelu", "gelu"]), default="quick_gelu", show_default=True,
              help="MLP activation of a .pt checkpoint: quick_gelu for OpenAI's weights, gelu for most open_clip ones.")
@click.option("--device", default="auto", show_default=True)
def clip_cache(clip_path: Path, data_path: Path, splits: tuple[str, ...], out: Path, batch_size: int,
               shard_size: int, activation: str, device: str) -> None:
    """Compute a frozen CLIP's global image and caption embeddings once (resumable), for CGE."""
    from xmcl.retrieval.clip.cache import build_clip_cache

    manifest = build_clip_cache(clip_path, data_path, out, splits, batch_size=batch_size, shard_size=shard_size,
                                device=device, activation=activation)
    click.echo(f"wrote {manifest}")


@main.command("train-clip")
@click.option("--data", "data_path", type=PathArg, default=None,
              help="Corpus folder or Karpathy JSON (raw images); sets data.path.")
@click.option("--config", "config_path", type=PathArg, default=None, help="YAML of ClipTrainConfig fields.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value.")
@click.option("--out", type=PathArg, required=True, help="Run folder; the best model is saved there in the "
                                                           "transformers CLIP format.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from OUT/last.pt when it exists.")
@OVERWRITE
def train_clip(data_path: Path | None, config_path: Path | None, overrides: tuple[str, ...], out: Path,
               resume: bool, overwrite: bool) -> None:
    """Train a small CLIP from scratch on a corpus (a CGE teacher for the shapes world)."""
    from xmcl.config import load_config
    from xmcl.retrieval.clip.config import ClipTrainConfig
    from xmcl.runtime.distributed import is_main_process
    from xmcl.training.clip_trainer import train_clip as run_train_clip

    data_override = [f"data.path={data_path}"] if data_path is not None else []
    cfg = load_config(ClipTrainConfig, config_path, [*data_override, *overrides])
    summary = run_train_clip(cfg, out, resume=resume, overwrite=overwrite)
    if is_main_process():  # once per job under torchrun
        click.echo(f"best val rSum {summary['best_rsum']:.2f} at epoch {summary['best_epoch']}; model in {out}")


# ------------------------------------------------------------------------------------- evaluate
@main.command()
@click.option("--checkpoint", type=PathArg, required=True, help=MODEL_HELP)
@click.option("--data", "data_path", type=PathArg, default=None,
              help="Corpus to evaluate on (default: the one the model was trained on).")
@click.option("--split", default="val", show_default=True)
@click.option("--protocol", "protocols", multiple=True, type=click.Choice(["all", "fold5"]), default=("all",),
              show_default=True, help="'all' = whole split (Flickr 1K, COCO 5K); 'fold5' = COCO 1K.")
@click.option("--out", type=PathArg, default=None, help="Write the metrics as JSON here.")
@click.option("--device", default="auto", show_default=True)
@click.option("--allow-feature-mismatch", is_flag=True,
              help="Evaluate on region features made otherwise than the training ones (backbone, weights, size).")
@RUNTIME_OPTION
@click.option("--threads", type=Positive, default=1, show_default=True, help="ONNX Runtime threads.")
def evaluate(checkpoint: Path, data_path: Path | None, split: str, protocols: tuple[str, ...], out: Path | None,
             device: str, allow_feature_mismatch: bool, runtime: str, threads: int) -> None:
    """Evaluate a trained model: R@1/5/10 both directions, median/mean rank, rSum."""
    from xmcl.metrics.retrieval import format_table, protocol_warnings, save_json
    from xmcl.retrieval.inference import evaluate_checkpoint
    from xmcl.runtime.files import check_output_file

    if out is not None:
        check_output_file(out, "--out")
    results = evaluate_checkpoint(checkpoint, data_path, split, protocols, device=device,
                                  allow_feature_mismatch=allow_feature_mismatch, runtime=runtime, threads=threads)
    for warning in protocol_warnings(results):
        click.echo(f"warning: {warning}", err=True)
    click.echo(format_table(results, label="protocol"))
    if out is not None:
        save_json(results, out)
        click.echo(f"wrote {out}")


# ----------------------------------------------------------------------------------------- demo
@main.command()
@click.option("--out", type=PathArg, default=Path("runs/demo"), show_default=True)
@click.option("--images", type=int, default=1500, show_default=True, help="Shapes-world images to generate.")
@click.option("--epochs", type=int, default=None, help="Override the demo config's epochs.")
def demo(out: Path, images: int, epochs: int | None) -> None:
    """Generate the shapes world, train its winning USER variant (CGE, tolerant queues) and the VSE++ baseline,
    print their recall side by side."""
    from xmcl.demo import run_demo

    click.echo(run_demo(out, num_images=images, epochs=epochs))


# -------------------------------------------------------------------------------------- distill
@main.group(cls=_Group)
def distill() -> None:
    """ST-SLidR: distil a frozen 2D backbone into a 3D point-cloud backbone, then probe it."""


@distill.command("pretrain")
@click.option("--config", "config_path", type=PathArg, required=True, help="YAML config (configs/distill_*.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value.")
@click.option("--out", type=PathArg, required=True, help="Run folder (checkpoints, log, curves).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from OUT/last.pt when it exists.")
@OVERWRITE
def distill_pretrain(config_path: Path, overrides: tuple[str, ...], out: Path, resume: bool, overwrite: bool) -> None:
    """Pretrain the 3D backbone with the (semantically tolerant, class-balanced) superpixel contrastive loss."""
    from xmcl.config import load_config
    from xmcl.distill.config import DistillConfig
    from xmcl.runtime.distributed import is_main_process
    from xmcl.training.distill_trainer import pretrain_distill

    checkpoint = pretrain_distill(load_config(DistillConfig, config_path, overrides), out, resume=resume,
                                  overwrite=overwrite)
    if is_main_process():  # once per job under torchrun
        click.echo(f"wrote {checkpoint}")


@distill.command("probe")
@click.option("--config", "config_path", type=PathArg, required=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value.")
@click.option("--checkpoint", type=PathArg, default=None, help="Pretrained 3D backbone (omit: random init).")
@click.option("--mode", type=click.Choice(["linear", "finetune"]), default="linear", show_default=True)
@click.option("--label-fraction", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True,
              help="Share of the probe's training labels used (e.g. 0.01).")
@click.option("--out", type=PathArg, required=True, help="Folder for probe_<mode>.json.")
def distill_probe(config_path: Path, overrides: tuple[str, ...], checkpoint: Path | None, mode: str,
                  label_fraction: float, out: Path) -> None:
    """3D semantic segmentation by linear probing or fine-tuning: per-class IoU and mIoU."""
    from xmcl.config import load_config
    from xmcl.distill.config import DistillConfig
    from xmcl.distill.probe import format_probe
    from xmcl.training.probe_trainer import run_probe

    result = run_probe(load_config(DistillConfig, config_path, overrides), checkpoint, out, mode=mode,
                       label_fraction=label_fraction)
    click.echo(format_probe(result))


# ---------------------------------------------------------------------------------------- export
@main.command()
@click.argument("checkpoint", type=PathArg)
@click.option("--out", type=PathArg, required=True, help="Model directory to write (appears whole or not at all).")
@click.option("--onnx", is_flag=True, help="Also write the encoders as ONNX graphs (for --runtime onnx).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Also write ONNX Runtime's dynamic int8 quantization of the text graph (for --runtime onnx-int8).")
@click.option("--overwrite", is_flag=True, help="Replace a model directory already in OUT.")
def export(checkpoint: Path, out: Path, onnx: bool, quantize: str | None, overwrite: bool) -> None:
    """Write a trained model (a checkpoint, or a model directory) as a directory that loads without the training
    code: config.json, model.safetensors (the encoders only), the vocabulary or tokenizer files, a model card
    (README.md) and, with --onnx, the encoders' ONNX graphs."""
    from xmcl.retrieval.export import export_model_dir

    click.echo(f"wrote {export_model_dir(checkpoint, out, overwrite=overwrite, onnx=onnx, quantize=bool(quantize))}")


# ---------------------------------------------------------------------------------------- search
@main.command("index")
@click.option("--checkpoint", type=PathArg, required=True, help=MODEL_HELP)
@click.option("--images", type=PathArg, required=True, help="Folder of images (jpg/png/webp, searched recursively).")
@click.option("--out", type=PathArg, required=True, help="Index folder (created, or updated in place).")
@click.option("--captions", type=PathArg, default=None,
              help="Captions: a Karpathy JSON, a JSONL with 'path' and 'caption(s)' (+ any fields), or "
                   "path<TAB>caption lines.")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--workers", type=int, default=0, show_default=True, help="Image decoding processes.")
@click.option("--shard-size", type=int, default=2048, show_default=True, help="Images per shard (the resume unit).")
@click.option("--index-type", type=click.Choice(["auto", "exact", "hnsw", "ivf_flat", "ivf_sq8", "ivf_pq"]),
              default="auto", show_default=True, help="auto: chosen from the size and --memory-budget.")
@click.option("--memory-budget", default=None,
              help="Memory the vector index may take, e.g. 8G (default: half the RAM).")
@click.option("--recall-target", type=float, default=0.95, show_default=True,
              help="recall@10 against exact search that nprobe / efSearch are tuned to reach.")
@click.option("--backbone", default=None, help="Override the backbone the checkpoint's features manifest records.")
@click.option("--backbone-weights", default=None, help="Where the recorded backbone weights are now (a path).")
@click.option("--image-size", type=int, default=None, help="Override the recorded image size.")
@click.option("--clip-path", default=None, help="Where the CGE teacher the checkpoint records is now.")
@TEXT_MODEL_OPTION
@click.option("--allow-mismatch", is_flag=True,
              help="Encode with a backbone, weights or image size other than the checkpoint's features were made with.")
@RUNTIME_OPTION
@click.option("--threads", type=Positive, default=None, help="ONNX Runtime threads (default: the usable cores).")
@click.option("--follow-links", is_flag=True, help="Index links to image files outside the folder too (their files "
              "are then searchable but not served: serve reaches files inside the folder only).")
def index_command(checkpoint: Path, images: Path, out: Path, captions: Path | None, device: str, batch_size: int,
                  workers: int, shard_size: int, index_type: str, memory_budget: str | None, recall_target: float,
                  backbone: str | None, backbone_weights: str | None, image_size: int | None, clip_path: str | None,
                  text_model: str | None, allow_mismatch: bool, runtime: str, threads: int | None,
                  follow_links: bool) -> None:
    """Encode a folder of images (and captions) with a trained model and index it (resumable, incremental)."""
    from xmcl.retrieval.index.build import IndexOptions, build_index, format_report
    from xmcl.retrieval.index.vectors import parse_size
    from xmcl.retrieval.retriever import Retriever
    from xmcl.runtime.device import usable_cores

    options = IndexOptions(shard_size=shard_size, batch_size=batch_size, num_workers=workers, index_type=index_type,
                           memory_budget=parse_size(memory_budget) if memory_budget else None,
                           recall_target=recall_target, follow_links=follow_links)
    retriever = Retriever.load(checkpoint, device, runtime=runtime, threads=threads or usable_cores(),
                               backbone=backbone, backbone_weights=backbone_weights, image_size=image_size,
                               clip_path=clip_path, text_model=text_model, allow_mismatch=allow_mismatch)
    report = build_index(retriever, images, out, captions, options)
    if report:
        click.echo(format_report(report, out))


@main.command()
@click.argument("index_dir", metavar="INDEX", type=PathArg)
@click.argument("text", required=False)
@click.option("--image", type=PathArg, default=None, help="Search by this image instead of a text.")
@click.option("--item", type=click.IntRange(min=0), default=None,
              help="Search by an indexed item (more like this; the item itself is left out).")
@click.option("-k", "k", type=int, default=10, show_default=True, help="Number of results.")
@click.option("--target", type=click.Choice(["images", "captions"]), default="images", show_default=True,
              help="What to find.")
@click.option("--json", "as_json", is_flag=True, help="Print {query, target, results: [...]} as JSON.")
@click.option("--checkpoint", type=PathArg, default=None, help=f"{MODEL_HELP} Default: the one the index records.")
@TEXT_MODEL_OPTION
@RUNTIME_OPTION
@click.option("--device", default="auto", show_default=True)
@click.option("--server", default=None, metavar="URL",
              help="Ask a running `xmcl serve` at URL (INDEX is then the name it serves the index by) instead of "
                   "loading the model.")
@click.option("--api-key", envvar="XMCL_API_KEY", default=None, help="The key of a --server that asks for one.")
def search(index_dir: Path, text: str | None, image: Path | None, item: int | None, k: int, target: str,
           as_json: bool, checkpoint: Path | None, text_model: str | None, runtime: str, device: str,
           server: str | None, api_key: str | None) -> None:
    """Search an index by a text ("a dog jumps over a fence"), an image (--image q.jpg) or an item (--item ID)."""
    import json

    from xmcl.errors import DataError
    from xmcl.retrieval.index.search import Searcher, format_results
    from xmcl.retrieval.index.vectors import set_search_threads
    from xmcl.serve.client import search_remote

    if sum(value is not None for value in (text, image, item)) != 1:
        raise DataError("give one query: a text, --image or --item")
    if server is not None:
        answer = search_remote(server, index_dir.name, text=text, image=image, item=item, k=k, target=target,
                               api_key=api_key)
        results, warning = answer["results"], answer.get("warning")
    else:
        set_search_threads(1)
        searcher = Searcher.open(index_dir, checkpoint, device, text_model=text_model, runtime=runtime)
        results = searcher.search(target=target, k=k, text=text, image=image, item=item)
        warning = searcher.retriever.vocabulary_warning(text) if text is not None else None
        warning = searcher.stale or warning
    if warning:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        query = {"text": text} if text is not None else {"image": str(image)} if image else {"item": item}
        click.echo(json.dumps({"query": query, "target": target, "results": results, "warning": warning}, indent=1))
    else:
        click.echo(format_results(results))


@main.command()
@click.argument("indexes", metavar="[NAME=]INDEX...", nargs=-1, required=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 = every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--max-upload-mb", type=click.FloatRange(min=0.0, min_open=True), default=10.0, show_default=True,
              help="Largest image upload accepted.")
@click.option("--threads", type=Positive, default=1, show_default=True,
              help="torch, FAISS and ONNX Runtime threads per query.")
@RUNTIME_OPTION
@click.option("--workers", type=Positive, default=2, show_default=True,
              help="Queries decoded, encoded and searched at once (more wait, up to 16; then 503).")
@click.option("--allow-host", "allowed_hosts", multiple=True, metavar="HOST",
              help="A Host header to answer (repeat; default: the loopback names for a loopback bind, any otherwise).")
@click.option("--api-key", envvar="XMCL_API_KEY", default=None,
              help="Ask every request but the page for this key (X-API-Key header or ?key=); also $XMCL_API_KEY.")
def serve(indexes: tuple[str, ...], host: str, port: int, device: str, max_upload_mb: float, threads: int,
          runtime: str, workers: int, allowed_hosts: tuple[str, ...], api_key: str | None) -> None:
    """Serve indexes over HTTP (POST /search, GET /items/ID, /thumbs/ID, /healthz, /metrics) and the page at /."""
    from xmcl.retrieval.index.search import open_searchers, parse_index_specs
    from xmcl.serve.app import default_allowed_hosts, listen
    from xmcl.serve.app import serve as run_server

    sock = listen(host, port)  # a port in use is said before the models load
    searchers = open_searchers(parse_index_specs(indexes), device, runtime=runtime, threads=threads)
    hosts = list(allowed_hosts) or default_allowed_hosts(host)
    if hosts is None and api_key is None:
        click.echo(f"warning: serving {host} to every Host header and without an API key: anyone who reaches "
                   f"this address can search the index and read its photos (see docs/serving.md, 'Exposing the "
                   f"service')",
                   err=True)
    click.echo(f"serving {', '.join(searchers)} on http://{host}:{port}/")
    run_server(searchers, sock, int(max_upload_mb * (1 << 20)), threads, workers, hosts, api_key)


if __name__ == "__main__":
    main()

"""ONNX graphs of a model's encoders (``xmcl export --onnx``), for ONNX Runtime (``xmcl.retrieval.onnx_runtime``).

Each graph maps what ``Retriever.prepare`` and the tokenizer produce to unit embeddings, with dynamic batch (and
sequence) axes:

- ``text_encoder.onnx``: ``input_ids (B, L) int64``, ``attention_mask (B, L) int64`` [, ``clip_text (B, c)``]
  -> ``embedding (B, d)``; the frozen text model of a locked-text model is inside;
- ``image_encoder.onnx``: for a model trained end to end on images, ``pixels (B, 3, H, W)`` (the evaluation
  transform's output) -> ``embedding``, its backbone inside; for a region-feature model, ``regions (B, R, D)`` (all
  R valid: grid cells) -> ``embedding``, the frozen PCA inside; [+ ``clip_image (B, c)`` for CGE];
- ``backbone.onnx`` (region-feature models): ``pixels (B, S, S, 3) uint8`` -> ``regions (B, h * w, C)``, the grid
  features as ``xmcl features`` stores them (``StoredGrid``).

Graphs are traced in eval mode from a copy of the encoders whose GPO poolings are tabulated (``TabulatedGPO``) up
to the longest input they take. ``quantize_int8`` adds ONNX Runtime's dynamic int8 quantization of the text graph
(weights int8, activations quantised per call), the one whose latency a query waits for.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from xmcl.nn.gpo import GPO, TabulatedGPO
from xmcl.nn.sequence import tracing_complete_sets
from xmcl.retrieval.dual_encoder import DualEncoder
from xmcl.retrieval.grid_features import StoredGrid

OPSET = 17
TEXT_GRAPH = "text_encoder.onnx"
IMAGE_GRAPH = "image_encoder.onnx"
BACKBONE_GRAPH = "backbone.onnx"
MAX_GRID_CELLS = 256  # the image tower's GPO table covers grids of up to 16 x 16 cells (512 px for EfficientNet-Lite0)


def int8_name(graph: str) -> str:
    """``text_encoder.onnx`` -> ``text_encoder.int8.onnx``."""
    return graph.replace(".onnx", ".int8.onnx")


class TextGraph(nn.Module):
    """``(input_ids, attention_mask[, clip_text]) -> (B, d)`` unit embeddings by ``encoders.encode_texts``."""

    def __init__(self, encoders: DualEncoder) -> None:
        super().__init__()
        self.encoders = encoders

    def forward(self, input_ids: Tensor, attention_mask: Tensor, clip_text: Tensor | None = None) -> Tensor:
        return self.encoders.encode_texts(input_ids, attention_mask.sum(dim=1), clip_text)


class ImageGraph(nn.Module):
    """``(pixels | regions[, clip_image]) -> (B, d)`` unit embeddings by ``encoders.encode_images``."""

    def __init__(self, encoders: DualEncoder) -> None:
        super().__init__()
        self.encoders = encoders

    def forward(self, inputs: Tensor, clip_image: Tensor | None = None) -> Tensor:
        return self.encoders.encode_images(inputs, None, clip_image)


def tabulated(encoders: DualEncoder, max_text_tokens: int) -> DualEncoder:
    """A copy of ``encoders`` (eval mode, CPU) whose GPO poolings are tabulated: the text tower's up to
    ``max_text_tokens``, the image tower's up to ``MAX_GRID_CELLS``."""
    twin = copy.deepcopy(encoders).cpu().eval()
    for tower, size in ((twin.text_encoder, max_text_tokens), (twin.image_encoder, MAX_GRID_CELLS)):
        if isinstance(tower.pooling, GPO):
            tower.pooling = TabulatedGPO.of(tower.pooling, size)
    return twin


def export_graph(module: nn.Module, example: tuple[Tensor, ...], names: list[str], dynamic: dict[str, dict[int, str]],
                 path: Path) -> Path:
    """Trace ``module`` on ``example`` (inputs named ``names``) into ``path`` with the ``dynamic`` axes."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on the Python-side checks it does not record
        torch.onnx.export(module.eval(), example, str(path), dynamo=False, opset_version=OPSET, input_names=names,
                          output_names=["embedding" if "embedding" in dynamic else "regions"],
                          dynamic_axes=dynamic, do_constant_folding=True)
    return path


def export_encoders(encoders: DualEncoder, max_text_tokens: int, image_size: int, out: Path,
                    grid: StoredGrid | None = None, quantize: bool = False) -> list[Path]:
    """Write the text and image graphs of ``encoders`` (and, for a region-feature model whose ``grid`` makes its grid
    features, ``backbone.onnx``) into ``out``; with ``quantize`` their int8 twins too. Returns the files written.
    ``image_size``: the side of the example image (the graphs take any size)."""
    cfg = encoders.cfg
    twin = tabulated(encoders, max_text_tokens)
    batch = {0: "batch"}
    written = []
    ids = torch.ones(2, 6, dtype=torch.long)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    text_inputs, text_names = (ids, mask), ["input_ids", "attention_mask"]
    text_axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                 "embedding": batch}
    if cfg.text_cge:
        text_inputs, text_names = (*text_inputs, torch.randn(2, cfg.clip_dim)), [*text_names, "clip_text"]
        text_axes["clip_text"] = batch
    written.append(export_graph(TextGraph(twin), text_inputs, text_names, text_axes, out / TEXT_GRAPH))

    if cfg.image_input == "images":
        image = torch.randn(2, 3, image_size, image_size)
        image_axes = {"pixels": {0: "batch", 2: "height", 3: "width"}, "embedding": batch}
        image_names = ["pixels"]
    elif grid is not None:
        grid = copy.deepcopy(grid).cpu().eval()
        pixels = torch.randint(0, 256, (2, image_size, image_size, 3), dtype=torch.uint8)
        written.append(export_graph(grid, (pixels,), ["pixels"], {"pixels": batch, "regions": batch},
                                    out / BACKBONE_GRAPH))
        with torch.no_grad():
            image = grid(pixels)
        image_axes = {"regions": batch, "embedding": batch}
        image_names = ["regions"]
    else:
        image = torch.randn(2, 7, cfg.region_dim)
        image_axes = {"regions": batch, "embedding": batch}
        image_names = ["regions"]
    image_inputs = (image,)
    if cfg.cge:
        image_inputs, image_names = (image, torch.randn(2, cfg.clip_dim)), [*image_names, "clip_image"]
        image_axes["clip_image"] = batch
    with tracing_complete_sets():  # the image graph's region sets are complete (every grid cell valid)
        written.append(export_graph(ImageGraph(twin), image_inputs, image_names, image_axes, out / IMAGE_GRAPH))
    if quantize:  # the text graph only: int8 image graphs indexed no faster (benchmarks/index_throughput.py)
        written.append(quantize_int8(out / TEXT_GRAPH))
    return written


def outlier_matmuls(graph: Path) -> list[str]:
    """The MatMul nodes of ``graph`` that stay float32 under int8: each transformer layer's feed-forward
    down-projection (``.../output/dense/MatMul`` outside ``attention``), whose input is the GELU's output with its
    few large values, which one int8 scale per row cannot hold."""
    import onnx

    nodes = onnx.load(str(graph), load_external_data=False).graph.node
    return [node.name for node in nodes
            if node.op_type == "MatMul" and "/output/dense/" in node.name and "/attention/" not in node.name]


def quantize_int8(graph: Path) -> Path:
    """ONNX Runtime's dynamic int8 quantization of ``graph`` into ``int8_name(graph)``: weights int8 per output
    channel, activations quantised per call, except ``outlier_matmuls``. Measured on the shipped Flickr8K model (val
    rSum, docs/results.md): per-tensor scales over every MatMul lost 16 rSum, per-channel scales 3.4, per-channel
    with the down-projections kept float32 none."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = graph.with_name(int8_name(graph.name))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's notes on tensors it leaves in float (the masks' indices)
    try:
        quantize_dynamic(str(graph), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=outlier_matmuls(graph))
    finally:
        root.setLevel(level)
    return target

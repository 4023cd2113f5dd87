"""A model directory's encoders under ONNX Runtime: the ``DualEncoder`` encoding interface over the graphs of
``xmcl.retrieval.onnx_export``, float32, or with the text graph's dynamic-int8 twin.

Sessions run on ``threads`` intra-op threads (one per query by default: a server answers queries side by side) with
all of ONNX Runtime's graph optimisations, and without spinning threads (a waiting thread sleeps instead of holding
a core that another process may need).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from xmcl.config import config_from_dict
from xmcl.data.images import Normalization
from xmcl.data.text import HFTokenizer, TextTokenizer, VocabTokenizer, Vocabulary
from xmcl.errors import CheckpointError, ConfigError, DataError
from xmcl.retrieval.config import RetrievalModelConfig, RetrievalTrainConfig
from xmcl.retrieval.onnx_export import BACKBONE_GRAPH, IMAGE_GRAPH, TEXT_GRAPH, int8_name

RUNTIMES = ("torch", "onnx", "onnx-int8")


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")


def open_session(path: Path, threads: int = 1):
    """An ONNX Runtime CPU session of ``path`` on ``threads`` intra-op threads, no spinning."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError("the onnx runtime needs the onnxruntime package: pip install 'xmcl[onnx]'") from None
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: export the model with `xmcl export ... --onnx` (and "
                              f"--quantize int8 for the int8 runtime)")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEncoders:
    """``encode_images`` / ``encode_texts`` of a model directory ``folder`` (its ``cfg``) under ONNX Runtime;
    ``int8``: the quantised text graph (images stay float32). Inputs and outputs as ``DualEncoder``'s (tensors), on
    the CPU; ``image_normalization``: the pixel normalisation the image graph expects (models trained end to end)."""

    def __init__(self, cfg: RetrievalModelConfig, folder: Path, int8: bool = False, threads: int = 1,
                 image_normalization: Normalization | None = None) -> None:
        self.cfg, self.image_normalization = cfg, image_normalization
        self.text = open_session(folder / (int8_name(TEXT_GRAPH) if int8 else TEXT_GRAPH), threads)
        self.image = open_session(folder / IMAGE_GRAPH, threads)
        self.image_input = self.image.get_inputs()[0].name

    def eval(self) -> "OnnxEncoders":
        return self

    def text_inputs(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The token ids of a batch (the text graph runs any frozen text model itself)."""
        if "tokens" not in batch:
            raise DataError(f"the batch has no 'tokens' (it has {sorted(batch)})")
        return batch["tokens"]

    def encode_texts(self, ids: Tensor, lengths: Tensor, clip_text: Tensor | None = None) -> Tensor:
        mask = (torch.arange(ids.shape[1]).unsqueeze(0) < lengths.cpu().unsqueeze(1)).long()
        feeds = {"input_ids": ids.cpu().numpy(), "attention_mask": mask.numpy()}
        if self.cfg.text_cge:
            feeds["clip_text"] = _guides(clip_text, "clip_text")
        return torch.from_numpy(self.text.run(None, feeds)[0])

    def encode_images(self, inputs: Tensor, lengths: Tensor | None = None, clip_image: Tensor | None = None) -> Tensor:
        if lengths is not None and bool((lengths != inputs.shape[1]).any()):
            raise ConfigError("the ONNX image graph takes region sets with every region valid (grid features)")
        feeds = {self.image_input: inputs.float().cpu().numpy()}
        if self.cfg.cge:
            feeds["clip_image"] = _guides(clip_image, "clip_image")
        return torch.from_numpy(self.image.run(None, feeds)[0])


class OnnxGridFeatures:
    """``backbone.onnx`` as a grid network: uint8 pixels ``(B, S, S, 3)`` -> ``StoredGrid``'s features."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        self.session = open_session(folder / BACKBONE_GRAPH, threads)

    def __call__(self, pixels: Tensor) -> Tensor:
        return torch.from_numpy(self.session.run(None, {"pixels": np.ascontiguousarray(pixels.cpu().numpy())})[0])


def load_onnx_encoders(path: Path, state: dict, manifest: dict | None, int8: bool = False, threads: int = 1
                       ) -> tuple[OnnxEncoders, TextTokenizer, RetrievalTrainConfig, dict]:
    """The ONNX Runtime encoders of the saved model at ``path`` (its ``state`` and ``manifest``: a model directory
    exported with ``--onnx``; None: a checkpoint), its tokenizer (the vocabulary, or the tokenizer files beside the
    graphs), config and ONNX record; ``CheckpointError`` saying how to export them when they are not there."""
    graphs = (manifest or {}).get("onnx")
    if not graphs:
        raise CheckpointError(f"{path} has no ONNX graphs: export it with `xmcl export {path} --out DIR --onnx` "
                              f"(add --quantize int8 for the int8 runtime) and load DIR")
    if int8 and not graphs.get("int8"):
        raise CheckpointError(f"{path} has no int8 graphs: export it with --onnx --quantize int8")
    cfg = config_from_dict(RetrievalTrainConfig, state["config"], where=str(path))
    if state.get("vocab"):
        tokenizer: TextTokenizer = VocabTokenizer(Vocabulary(state["vocab"]), cfg.data.max_caption_tokens)
    else:
        tokenizer = HFTokenizer(path / graphs["tokenizer"])
    normalization = graphs.get("normalization")
    if normalization is not None:
        normalization = Normalization(tuple(normalization["mean"]), tuple(normalization["std"]))
    return OnnxEncoders(cfg.model, path, int8, threads, normalization), tokenizer, cfg, graphs


def _guides(clip: Tensor | None, key: str) -> np.ndarray:
    if clip is None:
        raise ConfigError(f"this CGE model needs its CLIP guides ('{key}')")
    return clip.float().cpu().numpy()

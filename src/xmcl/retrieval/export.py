"""``xmcl export``: a training checkpoint (or a model directory) -> a model directory (``xmcl.retrieval.model_dir``
gives the layout and reads it back) with its model card, and optionally its ONNX graphs (``onnx_export``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import safetensors.torch
import torch
import yaml

from xmcl.config import config_to_dict
from xmcl.data.text import HFTokenizer, TextTokenizer
from xmcl.errors import CheckpointError, ConfigError
from xmcl.retrieval.config import RetrievalTrainConfig
from xmcl.retrieval.inference import SavedModel, model_from_state, open_saved_model
from xmcl.retrieval.model_dir import (CARD_FILE, CONFIG_FILE, MODEL_FORMAT, TEXT_MODEL_DIR, TOKENIZER_DIR,
                                      VOCAB_FILE, WEIGHTS_FILE, file_sha256)
from xmcl.retrieval.onnx_export import OPSET, export_encoders
from xmcl.retrieval.retriever import Retriever
from xmcl.runtime.files import atomic_directory, check_output_dir
from xmcl.runtime.log import read_jsonl

_HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
             "vocab.json", "merges.txt", "spiece.model")


def export_model_dir(source: Path | str, out: Path | str, overwrite: bool = False, onnx: bool = False,
                     quantize: bool = False) -> Path:
    """Write the model directory of ``source`` (a training checkpoint, or a model directory to export again, e.g.
    with ONNX graphs) to ``out`` (see ``xmcl.retrieval.model_dir``); ``out`` appears whole or not at all. A folder
    already there is refused unless ``overwrite`` (then replaced). ``onnx``: also the ONNX graphs of the encoders
    (``xmcl.retrieval.onnx_export``) and the tokenizer files they need; ``quantize``: the text graph's int8 twin."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out} already exists; give another --out or pass --overwrite to replace it")
    if quantize and not onnx:
        raise ConfigError("--quantize int8 quantizes the ONNX graphs: pass --onnx too")
    check_output_dir(out.parent, "the folder of --out")
    saved = open_saved_model(source)
    model, tokenizer, cfg = model_from_state(saved.state, str(saved.path), torch.device("cpu"))
    with atomic_directory(out, replace=overwrite) as staging:
        weights = {key: value.detach().contiguous().clone() for key, value in model.encoder_state_dict().items()}
        (staging / WEIGHTS_FILE).write_bytes(safetensors.torch.save(weights))
        if saved.state.get("vocab"):
            (staging / VOCAB_FILE).write_text(json.dumps({"words": saved.state["vocab"]}, ensure_ascii=False),
                                              encoding="utf-8")
        fine_tuned_text = cfg.model.text_encoder == "bert" and cfg.model.text_input == "tokens"
        if fine_tuned_text:
            _copy_hf_files(Path(tokenizer.tokenizer.name_or_path), staging / TEXT_MODEL_DIR)
        graphs = _export_onnx(saved.path, staging, quantize, fine_tuned_text) if onnx else None
        files = {p.relative_to(staging).as_posix(): file_sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        config = {"format": MODEL_FORMAT, "embed_dim": cfg.model.embed_dim, "config": config_to_dict(cfg),
                  "inputs": saved.state.get("inputs") or {}, "tokenizer": _tokenizer_record(cfg, tokenizer),
                  "files": files, "onnx": graphs, "trained": _training_record(saved)}
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=1), encoding="utf-8")
        (staging / CARD_FILE).write_text(model_card(out.name, config), encoding="utf-8")
    return out


def _export_onnx(source: Path, staging: Path, quantize: bool, fine_tuned_text: bool) -> dict:
    """The ONNX graphs of the model at ``source`` in ``staging`` (traced from its torch retriever, frozen text model
    and backbone included), the tokenizer files beside them, and their record for ``config.json``."""
    retriever = Retriever.load(source, "cpu")
    tokenizer_dir = TEXT_MODEL_DIR if fine_tuned_text else None
    if isinstance(retriever.tokenizer, HFTokenizer) and not fine_tuned_text:
        tokenizer_dir = TOKENIZER_DIR
        _copy_hf_files(Path(retriever.tokenizer.tokenizer.name_or_path), staging / TOKENIZER_DIR)
    grid = retriever.grid
    size = grid.image_size if grid is not None else retriever.cfg.data.image_size
    written = export_encoders(retriever.model, retriever.tokenizer.max_length, size, staging,
                              grid.network if grid is not None else None, quantize)
    normalization = None
    if retriever.transform is not None:
        normalization = {"mean": retriever.transform.mean.flatten().tolist(),
                         "std": retriever.transform.std.flatten().tolist()}
    return {"graphs": [path.name for path in written], "int8": quantize, "opset": OPSET, "image_size": size,
            "normalization": normalization, "tokenizer": tokenizer_dir}


def _copy_hf_files(source: Path, target: Path) -> None:
    target.mkdir()
    for name in _HF_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def _tokenizer_record(cfg: RetrievalTrainConfig, tokenizer: TextTokenizer) -> dict:
    if cfg.model.text_encoder == "bigru":
        return {"kind": "vocabulary", "file": VOCAB_FILE, "max_length": tokenizer.max_length}
    where = TEXT_MODEL_DIR if cfg.model.text_input == "tokens" else "the frozen text model's directory (inputs.text)"
    return {"kind": "huggingface", "files": where, "max_length": tokenizer.max_length}


def _training_record(saved: SavedModel) -> dict:
    """Where the weights were trained: the source checkpoint, its sha256, the epoch it holds and the validation
    figures of that epoch from the run's ``log.jsonl`` beside it (None when the log is not there); a model directory
    exported again keeps its record."""
    if saved.manifest is not None:
        return saved.manifest["trained"]
    state, checkpoint = saved.state, saved.path
    epoch = state.get("best_epoch") if checkpoint.name == "best.pt" else state.get("epoch")
    val = None
    log = checkpoint.parent / "log.jsonl"
    if log.is_file():
        for record in read_jsonl(log):
            if record.get("epoch") == epoch and "val_rsum" in record:
                val = {key[len("val_"):]: value for key, value in record.items() if key.startswith("val_")}
    return {"checkpoint": checkpoint.name, "checkpoint_sha256": saved.sha256, "epoch": epoch,
            "val_rsum": state.get("best_rsum"), "val": val}


def model_card(name: str, config: dict) -> str:
    """The README.md of a model directory: what the model is, how it was trained, its figures and how to use it."""
    model, data = config["config"]["model"], config["config"]["data"]
    inputs, trained = config["inputs"], config["trained"]
    features = inputs.get("features") or {}
    text = inputs.get("text") or {}
    lines = [f"# {name}", "",
             f"A USER dual encoder trained by xmcl: images and captions to {config['embed_dim']}-d unit embeddings "
             "whose dot product ranks one against the other.", "",
             "## Inputs",
             f"- Images: {_image_side(model, features)}",
             f"- Captions: {_text_side(model, text)}", "",
             "## Training",
             f"- Data: `{data['path']}` (splits {data['train_split']} / {data['val_split']}).",
             f"- From `{trained['checkpoint']}` (sha256 {trained['checkpoint_sha256'][:12]}...), epoch "
             f"{trained['epoch']}.", ""]
    val = trained.get("val")
    if val:
        lines += [f"## Validation ({data['val_split']} split, {val.get('images', '?')} images)", "",
                  "| direction | R@1 | R@5 | R@10 |", "| --- | --- | --- | --- |",
                  f"| image to text | {val['i2t_r1']:.1f} | {val['i2t_r5']:.1f} | {val['i2t_r10']:.1f} |",
                  f"| text to image | {val['t2i_r1']:.1f} | {val['t2i_r5']:.1f} | {val['t2i_r10']:.1f} |", "",
                  f"rSum {val['rsum']:.1f}.", ""]
    elif trained.get("val_rsum") is not None:
        lines += [f"## Validation\nrSum {trained['val_rsum']:.1f} on the {data['val_split']} split.", ""]
    lines += ["## Use", "```bash", f"xmcl index --checkpoint {name} --images PHOTOS --out runs/photos",
              "xmcl search runs/photos \"a dog runs on the beach\"", "```", "",
              "## Training config", "```yaml", yaml.safe_dump(config["config"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _image_side(model: dict, features: dict) -> str:
    if model["image_input"] == "images":
        return f"raw images through {model['backbone']} ({model['backbone_weights']}), trained end to end."
    if not features:
        return f"{model['region_dim']}-d region features (no features manifest)."
    pca = f", a frozen PCA to {model['region_pca_dim']}-d" if model.get("region_pca_dim") else ""
    return (f"{features.get('backbone')} grid features at {features.get('image_size')} px (weights "
            f"{features.get('weights')}, sha256 {str(features.get('weights_sha256'))[:12]}...){pca}.")


def _text_side(model: dict, text: dict) -> str:
    if model["text_encoder"] == "bigru":
        return "a word vocabulary (vocab.json) and a BiGRU."
    if model["text_input"] == "token_features":
        return (f"the frozen text model `{_installed_name(text.get('model'))}` (weights sha256 "
                f"{str(text.get('weights_sha256'))[:12]}..., {text.get('hidden_dim')}-d states), then the trained "
                f"projection and pooling.")
    return "a fine-tuned BERT-family model (text_model/ holds its config and tokenizer)."


def _installed_name(path: str | None) -> str:
    """A path inside an installed package as ``package/...`` (the same on every machine), any other as it is."""
    parts = Path(str(path)).parts
    return "/".join(parts[parts.index("site-packages") + 1:]) if "site-packages" in parts else str(path)

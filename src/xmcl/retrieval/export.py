"""``xmcl export``: a training checkpoint -> a model directory (``xmcl.retrieval.model_dir`` gives the layout and
reads it back) with its model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import safetensors.torch
import torch
import yaml

from xmcl.config import config_to_dict
from xmcl.errors import CheckpointError
from xmcl.retrieval.inference import load_retrieval_checkpoint, model_from_state
from xmcl.retrieval.model_dir import (CARD_FILE, CONFIG_FILE, MODEL_FORMAT, TEXT_MODEL_DIR, VOCAB_FILE,
                                      WEIGHTS_FILE, file_sha256)
from xmcl.runtime.files import atomic_directory, check_output_dir
from xmcl.runtime.log import read_jsonl

_HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
             "vocab.json", "merges.txt", "spiece.model")


def export_model_dir(checkpoint: Path | str, out: Path | str, overwrite: bool = False) -> Path:
    """Write the model directory of a training checkpoint to ``out`` (see the module docstring); ``out`` appears
    whole or not at all. A folder already there is refused unless ``overwrite`` (then replaced)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out} already exists; give another --out or pass --overwrite to replace it")
    check_output_dir(out.parent, "the folder of --out")
    state = load_retrieval_checkpoint(checkpoint)
    model, tokenizer, cfg = model_from_state(state, str(checkpoint), torch.device("cpu"))
    with atomic_directory(out, replace=overwrite) as staging:
        weights = {key: value.detach().contiguous().clone() for key, value in model.encoder_state_dict().items()}
        (staging / WEIGHTS_FILE).write_bytes(safetensors.torch.save(weights))
        if state.get("vocab"):
            (staging / VOCAB_FILE).write_text(json.dumps({"words": state["vocab"]}, ensure_ascii=False),
                                              encoding="utf-8")
        if cfg.model.text_encoder == "bert" and cfg.model.text_input == "tokens":
            _copy_hf_files(Path(tokenizer.tokenizer.name_or_path), staging / TEXT_MODEL_DIR)
        files = {p.relative_to(staging).as_posix(): file_sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        trained = _training_record(checkpoint, state)
        config = {"format": MODEL_FORMAT, "embed_dim": cfg.model.embed_dim, "config": config_to_dict(cfg),
                  "inputs": state.get("inputs") or {}, "tokenizer": _tokenizer_record(cfg, tokenizer),
                  "files": files, "trained": trained}
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=1), encoding="utf-8")
        (staging / CARD_FILE).write_text(model_card(out.name, config), encoding="utf-8")
    return out


def _copy_hf_files(source: Path, target: Path) -> None:
    target.mkdir()
    for name in _HF_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def _tokenizer_record(cfg, tokenizer) -> dict:
    if cfg.model.text_encoder == "bigru":
        return {"kind": "vocabulary", "file": VOCAB_FILE, "max_length": tokenizer.max_length}
    where = TEXT_MODEL_DIR if cfg.model.text_input == "tokens" else "the frozen text model's directory (inputs.text)"
    return {"kind": "huggingface", "files": where, "max_length": tokenizer.max_length}


def _training_record(checkpoint: Path, state: dict) -> dict:
    """The source checkpoint, its sha256, the epoch it holds and the validation figures of that epoch from the run's
    ``log.jsonl`` beside it (None when the log is not there)."""
    epoch = state.get("best_epoch") if checkpoint.name == "best.pt" else state.get("epoch")
    val = None
    log = checkpoint.parent / "log.jsonl"
    if log.is_file():
        for record in read_jsonl(log):
            if record.get("epoch") == epoch and "val_rsum" in record:
                val = {key[len("val_"):]: value for key, value in record.items() if key.startswith("val_")}
    return {"checkpoint": checkpoint.name, "checkpoint_sha256": file_sha256(checkpoint), "epoch": epoch,
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
        return (f"the frozen text model {text.get('model')} (weights sha256 {str(text.get('weights_sha256'))[:12]}"
                f"..., {text.get('hidden_dim')}-d states), then the trained projection and pooling.")
    return "a fine-tuned BERT-family model (text_model/ holds its config and tokenizer)."


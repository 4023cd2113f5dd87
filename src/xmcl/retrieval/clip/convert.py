"""OpenAI / open_clip ``.pt`` checkpoints -> ``transformers.CLIPModel`` weights.

A ``.pt`` file is a TorchScript archive (OpenAI's release), a plain state dict, or a training checkpoint
``{"state_dict": ...}`` (a ``module.`` prefix is dropped). Its ViT keys are mapped by :func:`openai_to_transformers`;
shapes give the configuration (heads = width / 64, OpenAI's rule; ``activation`` is QuickGELU for OpenAI's weights,
``"gelu"`` for most open_clip ones). ResNet towers are refused.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from torch import Tensor

from xmcl.errors import CheckpointError
from xmcl.runtime.checkpoint import safe_load

ACTIVATIONS = ("quick_gelu", "gelu")  # OpenAI's weights / most open_clip ones
HEAD_WIDTH = 64  # OpenAI CLIP: attention heads = width / 64
IGNORED_OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")  # TorchScript scalars, not weights


def load_openai_state_dict(path: Path | str) -> dict[str, Tensor]:
    """The weights of an OpenAI / open_clip ``.pt`` file (TorchScript archive, plain or wrapped state dict)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"CLIP checkpoint {path} does not exist")
    try:
        is_torchscript = zipfile.is_zipfile(path) and any(
            name.endswith("constants.pkl") for name in zipfile.ZipFile(path).namelist())
        if is_torchscript:  # TorchScript's own unpickler builds no Python objects
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"CLIP checkpoint {path} cannot be read: {error}") from None
    if not is_torchscript:
        state = safe_load(path, "CLIP checkpoint")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"CLIP checkpoint {path} does not hold a state dict of tensors")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return {key: value.float() if value.is_floating_point() else value for key, value in state.items()}


def _layer_count(state: dict[str, Tensor], prefix: str) -> int:
    return len({key[len(prefix):].split(".")[0] for key in state if key.startswith(prefix)})


def _map_tower(state: dict[str, Tensor], src: str, dst: str, layers: int, out: dict[str, Tensor],
               used: set[str]) -> None:
    """One transformer stack: ``{src}{i}.attn.in_proj_*`` split into q/k/v, the rest renamed."""
    renames = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(layers):
        block, target = f"{src}{i}.", f"{dst}{i}."
        for kind in ("weight", "bias"):
            q, k, v = _take(state, f"{block}attn.in_proj_{kind}", used).chunk(3, dim=0)
            out.update({f"{target}self_attn.q_proj.{kind}": q, f"{target}self_attn.k_proj.{kind}": k,
                        f"{target}self_attn.v_proj.{kind}": v})
            for old, new in renames.items():
                out[f"{target}{new}.{kind}"] = _take(state, f"{block}{old}.{kind}", used)


def _take(state: dict[str, Tensor], key: str, used: set[str]) -> Tensor:
    if key not in state:
        raise CheckpointError(f"the CLIP state dict lacks '{key}'")
    used.add(key)
    return state[key]


def openai_to_transformers(state: dict[str, Tensor], activation: str = "quick_gelu"):
    """``(CLIPConfig, state dict of transformers.CLIPModel)`` from OpenAI-layout ViT CLIP weights.

    Text: ``token_embedding``, ``positional_embedding``, ``transformer.resblocks.i``, ``ln_final``,
    ``text_projection`` (width x dim, transposed into a linear layer); vision: ``visual.conv1``,
    ``visual.class_embedding``, ``visual.positional_embedding``, ``visual.ln_pre``,
    ``visual.transformer.resblocks.i``, ``visual.ln_post``, ``visual.proj``; ``logit_scale``. Any other key
    raises ``CheckpointError`` naming it. The end-of-text id is the last vocabulary id, as in CLIP.
    """
    from transformers import CLIPConfig

    if "visual.proj" not in state and any(key.startswith("visual.layer1.") for key in state):
        raise CheckpointError("this CLIP state dict has a ResNet image tower (visual.layer1...); only ViT towers "
                              "map onto transformers.CLIPModel")
    used: set[str] = set()
    text_width = _take(state, "ln_final.weight", used).shape[0]
    vision_width = _take(state, "visual.conv1.weight", used).shape[0]
    for name, width in (("text", text_width), ("vision", vision_width)):
        if width % HEAD_WIDTH:
            raise CheckpointError(f"the CLIP {name} tower is {width} wide, not a multiple of the {HEAD_WIDTH}-wide "
                                  f"heads OpenAI's layout implies")
    text_layers = _layer_count(state, "transformer.resblocks.")
    vision_layers = _layer_count(state, "visual.transformer.resblocks.")
    vocab_size = _take(state, "token_embedding.weight", used).shape[0]
    context = _take(state, "positional_embedding", used).shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((_take(state, "visual.positional_embedding", used).shape[0] - 1) ** 0.5)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=text_width, num_hidden_layers=text_layers,
                         num_attention_heads=text_width // HEAD_WIDTH, max_position_embeddings=context,
                         intermediate_size=_take(state, "transformer.resblocks.0.mlp.c_fc.weight", used).shape[0],
                         hidden_act=activation, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                         pad_token_id=0),
        vision_config=dict(hidden_size=vision_width, num_hidden_layers=vision_layers,
                           num_attention_heads=vision_width // HEAD_WIDTH, patch_size=patch, image_size=patch * grid,
                           intermediate_size=_take(state, "visual.transformer.resblocks.0.mlp.c_fc.weight",
                                                    used).shape[0],
                           hidden_act=activation),
        projection_dim=_take(state, "text_projection", used).shape[1],
    )
    out = {
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": _take(state, "ln_final.bias", used),
        "text_projection.weight": state["text_projection"].T.contiguous(),
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": _take(state, "visual.class_embedding", used),
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.post_layernorm.weight": _take(state, "visual.ln_post.weight", used),
        "vision_model.post_layernorm.bias": _take(state, "visual.ln_post.bias", used),
        "visual_projection.weight": _take(state, "visual.proj", used).T.contiguous(),
        "logit_scale": _take(state, "logit_scale", used).reshape(()),
    }
    # the transformers name keeps its historical spelling "pre_layrnorm"
    out["vision_model.pre_layrnorm.weight"] = _take(state, "visual.ln_pre.weight", used)
    out["vision_model.pre_layrnorm.bias"] = _take(state, "visual.ln_pre.bias", used)
    _map_tower(state, "transformer.resblocks.", "text_model.encoder.layers.", text_layers, out, used)
    _map_tower(state, "visual.transformer.resblocks.", "vision_model.encoder.layers.", vision_layers, out, used)
    unknown = sorted(set(state) - used - set(IGNORED_OPENAI_KEYS))
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise CheckpointError(f"the CLIP state dict has keys the OpenAI ViT layout does not know: "
                              f"{', '.join(unknown[:5])}{more}")
    return config, out


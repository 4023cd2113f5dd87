"""The frozen CLIP teacher: both loading paths agree on the same weights, preprocessing, tokenizer, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from xmcl.data.images import CLIP
from xmcl.errors import CheckpointError, ConfigError
from xmcl.retrieval.clip.preprocess import ClipImagePreprocess
from xmcl.retrieval.clip.teacher import checkpoint_sha256, load_clip_teacher
from xmcl.retrieval.clip.tokenizer import ClipTokenizer, byte_alphabet, clip_vocabulary, packaged_bpe_file

MERGES = [("d", "o"), ("do", "g</w>"), ("c", "a"), ("ca", "t</w>")]
WIDTH, LAYERS, CONTEXT, PROJ, IMAGE, PATCH = 64, 2, 16, 24, 32, 8
TEXTS = ["a dog", "a cat", "dog cat dog", "a"]


def write_tokenizer(directory):
    vocab = clip_vocabulary(MERGES)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in MERGES) + "\n")
    return vocab


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random tiny CLIPModel saved by transformers with a 4-merge CLIP BPE vocabulary."""
    from transformers import CLIPConfig, CLIPModel

    directory = tmp_path_factory.mktemp("tiny_clip")
    vocab_size = len(write_tokenizer(directory))
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                         num_hidden_layers=LAYERS, num_attention_heads=WIDTH // 64, max_position_embeddings=CONTEXT,
                         hidden_act="quick_gelu", bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                         pad_token_id=0),
        vision_config=dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS,
                           num_attention_heads=WIDTH // 64, image_size=IMAGE, patch_size=PATCH,
                           hidden_act="quick_gelu"),
        projection_dim=PROJ)
    torch.manual_seed(0)
    model = CLIPModel(config)
    with torch.no_grad():  # larger random weights than the default init, so that a wrong mapping shows
        for param in model.parameters():
            param.normal_(0, 0.2)
    model.save_pretrained(str(directory))
    return directory


def to_openai_layout(hf: dict) -> dict:
    """Hand-written transformers -> OpenAI key mapping (the inverse of what the loader does)."""
    out = {
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].T.contiguous(),
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": hf["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": hf["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": hf["vision_model.post_layernorm.bias"],
        "visual.proj": hf["visual_projection.weight"].T.contiguous(),
        "logit_scale": hf["logit_scale"],
    }
    for ours, theirs in (("transformer.resblocks", "text_model.encoder.layers"),
                         ("visual.transformer.resblocks", "vision_model.encoder.layers")):
        for i in range(LAYERS):
            a, b = f"{ours}.{i}", f"{theirs}.{i}"
            for kind in ("weight", "bias"):
                out[f"{a}.attn.in_proj_{kind}"] = torch.cat([hf[f"{b}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
                out[f"{a}.attn.out_proj.{kind}"] = hf[f"{b}.self_attn.out_proj.{kind}"]
                out[f"{a}.ln_1.{kind}"] = hf[f"{b}.layer_norm1.{kind}"]
                out[f"{a}.ln_2.{kind}"] = hf[f"{b}.layer_norm2.{kind}"]
                out[f"{a}.mlp.c_fc.{kind}"] = hf[f"{b}.mlp.fc1.{kind}"]
                out[f"{a}.mlp.c_proj.{kind}"] = hf[f"{b}.mlp.fc2.{kind}"]
    return out


@pytest.fixture(scope="module")
def openai_state(clip_dir):
    from transformers import CLIPModel

    hf = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).state_dict()
    state = to_openai_layout(hf)
    state["input_resolution"] = torch.tensor(IMAGE)  # scalars OpenAI's TorchScript archives carry
    return state


class Holder(nn.Module):
    def forward(self) -> int:
        return 0


def torchscript_archive(state: dict, path):
    """Save ``state`` as a TorchScript archive whose ``state_dict()`` has exactly these keys."""
    root = Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, Holder())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    torch.jit.script(root).save(str(path))


def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)]


def test_both_loading_paths_give_the_same_embeddings(clip_dir, openai_state, tmp_path):
    plain, scripted = tmp_path / "plain.pt", tmp_path / "scripted.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in openai_state.items()}}, plain)
    torchscript_archive(openai_state, scripted)
    reference = load_clip_teacher(clip_dir)
    img_ref, txt_ref = reference.encode_images(images()), reference.encode_texts(TEXTS)
    assert img_ref.shape == (2, PROJ) and txt_ref.shape == (len(TEXTS), PROJ)
    assert torch.allclose(img_ref.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert (img_ref[0] - img_ref[1]).abs().max() > 1e-2 and (txt_ref[0] - txt_ref[1]).abs().max() > 1e-2
    for path in (plain, scripted):
        teacher = load_clip_teacher(path, tokenizer=clip_dir)
        assert torch.allclose(teacher.encode_images(images()), img_ref, atol=1e-5)
        assert torch.allclose(teacher.encode_texts(TEXTS), txt_ref, atol=1e-5)
        assert teacher.sha256 == checkpoint_sha256(path) != reference.sha256


def test_teacher_is_frozen_and_text_pools_at_the_end_token(clip_dir):
    teacher = load_clip_teacher(clip_dir)
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    ids, mask = teacher.tokenizer.batch(["a dog", "a"])
    padded = teacher.encode_token_ids(ids, mask)
    alone = teacher.encode_token_ids(*teacher.tokenizer.batch(["a"]))
    assert torch.allclose(padded[1], alone[0], atol=1e-5)  # padding after the end token changes nothing


def test_tokenizer_ids_by_hand(clip_dir):
    tokenizer = ClipTokenizer.from_directory(clip_dir, context_length=5)
    vocab = json.loads((clip_dir / "vocab.json").read_text())
    start, end = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert tokenizer.encode("A  Dog") == [start, vocab["a</w>"], vocab["dog</w>"], end]
    assert tokenizer.encode("dog&amp;cat") == [start, vocab["dog</w>"], vocab["&</w>"], vocab["cat</w>"], end]
    # "dogs" is not a merge: d+o merge, then g and s</w> stay apart; cut to 5 ids with the end id kept
    assert tokenizer.encode("dogs cat") == [start, vocab["do"], vocab["g"], vocab["s</w>"], end]
    ids, mask = tokenizer.batch(["a", "a dog"])
    assert ids.tolist() == [[start, vocab["a</w>"], end, 0], [start, vocab["a</w>"], vocab["dog</w>"], end]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_byte_alphabet_layout():
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = byte_alphabet()
    assert len(set(alphabet)) == 256 and set(alphabet) == set(ByteLevel.alphabet())
    assert alphabet[0] == "!" and alphabet[ord("a") - ord("!")] == "a" and alphabet[188] == chr(256)


@pytest.mark.skipif(packaged_bpe_file() is None, reason="open_clip_torch wheel (CLIP BPE vocabulary) not installed")
def test_real_clip_vocabulary_ids():
    from xmcl.retrieval.clip.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(None)
    assert tokenizer.vocab_size == 49408
    assert tokenizer.encode("a dog") == [49406, 320, 1929, 49407]


def test_preprocessing_against_hand_computation():
    mean, std = np.array(CLIP.mean), np.array(CLIP.std)
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (4, 9, 3), dtype=np.uint8)  # short side already 4: no resize, crop offset round(2.5)=2
    out = ClipImagePreprocess(4)(wide).numpy().transpose(1, 2, 0)
    assert np.allclose(out, (wide[:, 2:6] - mean) / std, atol=1e-5)
    tall = rng.integers(0, 256, (7, 4, 3), dtype=np.uint8)  # offset round(1.5) = 2
    out = ClipImagePreprocess(4)(Image.fromarray(tall)).numpy().transpose(1, 2, 0)
    assert np.allclose(out, (tall[2:6] - mean) / std, atol=1e-5)
    flat = np.full((30, 60, 3), (200, 10, 90), dtype=np.uint8)  # resized to 10 x 20, then cut to 10 x 10
    out = ClipImagePreprocess(10)(flat)
    assert out.shape == (3, 10, 10)
    assert np.allclose(out.numpy(), ((np.array([200, 10, 90]) - mean) / std)[:, None, None], atol=1e-4)


def test_bad_checkpoints_name_what_is_missing(clip_dir, openai_state, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_clip_teacher(empty)
    (empty / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="has no weights"):
        load_clip_teacher(empty)
    extra = dict(openai_state, **{"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(WIDTH)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="do(es)? not know: visual.transformer.resblocks.0.ls_1.gamma"):
        load_clip_teacher(tmp_path / "extra.pt", tokenizer=clip_dir)
    lacking = {k: v for k, v in openai_state.items() if k != "visual.ln_post.bias"}
    torch.save(lacking, tmp_path / "lacking.pt")
    with pytest.raises(CheckpointError, match="lacks 'visual.ln_post.bias'"):
        load_clip_teacher(tmp_path / "lacking.pt", tokenizer=clip_dir)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_clip_teacher(tmp_path / "nowhere.pt")
    with pytest.raises(ConfigError, match="activation must be one of"):
        load_clip_teacher(tmp_path / "lacking.pt", activation="relu")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_clip_teacher(tmp_path / "junk.pt")


def test_tokenizer_that_does_not_fit_the_model_is_refused(clip_dir, tmp_path):
    with pytest.raises(ConfigError, match="no tokenizer"):
        ClipTokenizer.from_directory(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    merges = MERGES + [("a", "t</w>")]
    (other / "vocab.json").write_text(json.dumps(clip_vocabulary(merges)))
    (other / "merges.txt").write_text("\n".join(" ".join(m) for m in merges))
    with pytest.raises(CheckpointError, match="tokenizer has 519 ids, the model 518"):
        load_clip_teacher(clip_dir, tokenizer=other)

"""CLIP-guided enhancement: the operator against a loop, the SGE/CGE switches, guides in batches, and CGE end to
end (cache -> training -> evaluation of new images through the teacher)."""

import itertools
import math

import numpy as np
import pytest
import torch

from xmcl.config import load_config
from xmcl.data.batches import CaptionPairs, Collate, SplitImages
from xmcl.data.open import open_split
from xmcl.data.shapes import generate_shapes_world
from xmcl.data.text import VocabTokenizer, Vocabulary
from xmcl.errors import DataError
from xmcl.metrics.retrieval import evaluate_embeddings
from xmcl.retrieval.cge import CGE
from xmcl.retrieval.clip.cache import SplitGuides, build_clip_cache
from xmcl.retrieval.clip.config import ClipModelConfig
from xmcl.retrieval.clip.small import new_clip_model, save_clip
from xmcl.retrieval.clip.teacher import load_clip_teacher
from xmcl.retrieval.clip.tokenizer import train_bpe
from xmcl.retrieval.config import RetrievalLossConfig, RetrievalModelConfig, RetrievalTrainConfig
from xmcl.retrieval.inference import encode_split, evaluate_checkpoint
from xmcl.retrieval.model import USERModel
from xmcl.training.retrieval_trainer import train_retrieval

from helpers import load_trained

EMBED, REGION_DIM, CLIP_DIM, VOCAB = 8, 6, 4, 20


def test_cge_operator_against_a_loop():
    torch.manual_seed(0)
    cge, lam = CGE(CLIP_DIM, REGION_DIM, lam=0.7), 0.7
    local, lengths, clip = torch.randn(3, 5, REGION_DIM), torch.tensor([5, 3, 1]), torch.randn(3, CLIP_DIM)
    out = cge(local, lengths, clip)
    weight, bias = cge.projection.weight.detach(), cge.projection.bias.detach()
    for b in range(3):
        g = [sum(weight[j, k].item() * clip[b, k].item() for k in range(CLIP_DIM)) + bias[j].item()
             for j in range(REGION_DIM)]
        norm = math.sqrt(sum(x * x for x in g))
        g = [x / norm for x in g]
        n = int(lengths[b])
        scores = [lam * sum(g[j] * local[b, i, j].item() for j in range(REGION_DIM)) for i in range(n)]
        p = [math.exp(s - max(scores)) for s in scores]
        p = [x / sum(p) for x in p]
        a = [x / math.sqrt(sum(y * y for y in p)) for x in p]
        for i in range(5):
            expected = [local[b, i, j].item() + (a[i] * g[j] if i < n else 0.0) for j in range(REGION_DIM)]
            assert torch.allclose(out[b, i].detach(), torch.tensor(expected), atol=1e-5), (b, i)


def test_cge_names_a_width_mismatch():
    cge = CGE(CLIP_DIM, REGION_DIM)
    with pytest.raises(DataError, match=r"\(B, 4\) \(model.clip_dim\), got shape \(2, 5\)"):
        cge(torch.randn(2, 3, REGION_DIM), torch.tensor([3, 3]), torch.randn(2, 5))


def tiny(**overrides) -> RetrievalModelConfig:
    values = dict(embed_dim=EMBED, region_dim=REGION_DIM, text_encoder="bigru", word_dim=8, queue_size=8,
                  sge_dropout=0.0, clip_dim=CLIP_DIM)
    values.update(overrides)
    return RetrievalModelConfig(**values)


def batch(num=4, seed=0, guides=True):
    gen = torch.Generator().manual_seed(seed)
    out = {"regions": torch.randn(num, 5, REGION_DIM, generator=gen), "region_lengths": torch.tensor([5, 4, 2, 5]),
           "tokens": torch.randint(5, VOCAB, (num, 6), generator=gen), "token_lengths": torch.tensor([6, 3, 6, 4]),
           "image_ids": torch.arange(num)}
    if guides:
        out["clip_image"] = torch.randn(num, CLIP_DIM, generator=gen)
        out["clip_text"] = torch.randn(num, CLIP_DIM, generator=gen)
    return out


def test_sge_and_cge_switch_independently():
    assert RetrievalModelConfig().cge is False and RetrievalModelConfig().text_cge is False
    for sge, cge, text_cge in itertools.product((False, True), repeat=3):
        model = USERModel(tiny(sge=sge, cge=cge, text_cge=text_cge), RetrievalLossConfig(), vocab_size=VOCAB)
        assert (model.image_encoder.sge is not None) == sge
        assert (model.image_encoder.cge is not None) == cge and (model.text_encoder.cge is not None) == text_cge
        assert (model.image_key_encoder.cge is not None) == cge
        losses = model(batch())
        losses["loss"].backward()
        assert torch.isfinite(losses["loss"])
        if cge:
            assert model.image_encoder.cge.projection.weight.grad.abs().sum() > 0
        if text_cge:
            assert model.text_encoder.cge.projection.weight.grad.abs().sum() > 0


def test_guides_matter_only_when_cge_is_on():
    data, other = batch(seed=0), batch(seed=1)
    torch.manual_seed(0)
    with_cge = USERModel(tiny(cge=True, text_cge=True), RetrievalLossConfig(), vocab_size=VOCAB)
    a = with_cge.encode_images(data["regions"], data["region_lengths"], data["clip_image"])
    b = with_cge.encode_images(data["regions"], data["region_lengths"], other["clip_image"])
    assert (a - b).abs().max() > 1e-4
    t = with_cge.encode_texts(data["tokens"], data["token_lengths"], data["clip_text"])
    u = with_cge.encode_texts(data["tokens"], data["token_lengths"], other["clip_text"])
    assert (t - u).abs().max() > 1e-4
    with pytest.raises(DataError, match="model.cge.*'clip_image'.*xmcl clip-cache"):
        with_cge.encode_images(data["regions"], data["region_lengths"])
    images_only = dict(batch(guides=False), clip_image=data["clip_image"])
    with pytest.raises(DataError, match="model.text_cge.*'clip_text'"):
        with_cge(images_only)
    torch.manual_seed(0)
    without = USERModel(tiny(), RetrievalLossConfig(), vocab_size=VOCAB)
    assert torch.equal(without.encode_images(data["regions"], data["region_lengths"], data["clip_image"]),
                       without.encode_images(data["regions"], data["region_lengths"]))


def test_items_carry_their_guides():
    split = load_split_of_features()
    vocab = Vocabulary.build(split.captions)
    image_guides = np.arange(3 * CLIP_DIM, dtype=np.float16).reshape(3, CLIP_DIM)
    text_guides = -np.arange(6 * CLIP_DIM, dtype=np.float16).reshape(6, CLIP_DIM)
    pairs = CaptionPairs(split, VocabTokenizer(vocab), clip_image=image_guides, clip_text=text_guides)
    collated = Collate(0)([pairs[m] for m in (5, 0, 2)])
    assert collated["clip_image"].tolist() == image_guides[[2, 0, 1]].astype(np.float32).tolist()
    assert collated["clip_text"].tolist() == text_guides[[5, 0, 2]].astype(np.float32).tolist()
    assert "clip_image" not in Collate(0)([SplitImages(split)[0]])
    with pytest.raises(DataError, match="shape \\(2, 4\\) do not give one row per image \\(3\\)"):
        SplitImages(split, clip_image=image_guides[:2])


def load_split_of_features():
    from xmcl.data.corpus import CaptionSplit

    return CaptionSplit(name="train", source="memory", image_ids=["a", "b", "c"],
                        captions=["red dot", "blue dot", "red square", "blue square", "a star", "two stars"],
                        caption_image=np.array([0, 0, 1, 1, 2, 2]),
                        region_features=np.zeros((3, 2, REGION_DIM), np.float32))


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 20-image shapes world, a random tiny CLIP, and a cache of its train and val splits (not test)."""
    root = tmp_path_factory.mktemp("cge")
    generate_shapes_world(root / "shapes", num_images=20, seed=0, image_size=64, progress=False)
    torch.manual_seed(0)
    clip_cfg = ClipModelConfig(image_size=32, patch_size=8, width=64, layers=1, heads=1, embed_dim=CLIP_DIM,
                              context_length=24)
    vocab, merges = train_bpe(open_split(root / "shapes", "train").captions, 600)
    save_clip(new_clip_model(clip_cfg, len(vocab)), vocab, merges, root / "clip")
    build_clip_cache(root / "clip", root / "shapes", root / "cache", splits=("train", "val"), device="cpu",
                     progress=False)
    return root


@pytest.mark.slow
def test_cge_end_to_end_with_new_images_encoded_by_the_teacher(world, tmp_path):
    cfg = load_config(RetrievalTrainConfig, None, [
        f"data.path={world / 'shapes'}", "run.device=cpu", "data.image_size=32", "data.augment_images=false",
        "model.image_input=images", "model.backbone=resnet18", "model.backbone_weights=null",
        "model.backbone_trainable=frozen", "model.embed_dim=16", "model.text_encoder=bigru", "model.word_dim=8",
        "model.queue_size=16",
        "model.sge=false", "model.cge=true", "model.text_cge=true", f"model.clip_dim={CLIP_DIM}",
        f"model.clip_cache={world / 'cache'}", f"model.clip_path={world / 'clip'}",
        "optim.epochs=1", "optim.batch_size=20"])
    summary = train_retrieval(cfg, tmp_path / "run", progress=False)
    val = evaluate_checkpoint(summary["best"], None, "val", ("all",), device="cpu")["all"]
    assert val.rsum == pytest.approx(summary["best_rsum"])  # the trainer's validation read the same guides

    # the test split is not cached: evaluation encodes its images and captions with the teacher
    metrics = evaluate_checkpoint(summary["best"], None, "test", ("all",), device="cpu")["all"]
    model, tokenizer, _ = load_trained(summary["best"], torch.device("cpu"))
    test = open_split(world / "shapes", "test")
    teacher = load_clip_teacher(world / "clip")
    guides = SplitGuides(teacher.encode_images(test.image_paths).numpy().astype(np.float16).astype(np.float32),
                         teacher.encode_texts(test.captions).numpy().astype(np.float16).astype(np.float32), None)
    from xmcl.retrieval.inference import image_transform

    img, txt = encode_split(model, test, tokenizer, image_transform(cfg.model, model, 32, train=False),
                            torch.device("cpu"), guides=guides)
    expected = evaluate_embeddings(img, txt, test.caption_image, protocols=("all",))["all"]
    assert metrics.rsum == pytest.approx(expected.rsum) and metrics.i2t_r1 == pytest.approx(expected.i2t_r1)

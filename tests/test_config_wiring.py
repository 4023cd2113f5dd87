"""Config wiring: values written in YAML (or ``--set``) reach the objects built from them.

Each check compares a loss value against a hand computation with the configured constants (so a builder that
falls back to a default changes the number), or a loaded config against the raw YAML mapping of its file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from xmcl.config import BASE_KEY, config_to_dict, load_config
from xmcl.distill.config import DistillConfig
from xmcl.distill.geometry import project_points
from xmcl.distill.networks import build_image_head, build_voxel_net
from xmcl.distill.objective import build_distill_loss, distillation_loss
from xmcl.distill.preparation import load_scenes, prepare_scene, scene_points, voxelize_scenes
from xmcl.distill.superpixels import SuperpixelCache
from xmcl.retrieval.config import RetrievalTrainConfig
from xmcl.retrieval.model import USERModel

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# ----------------------------------------------------------------------------------------------------------------
# (a) retrieval loss constants: YAML -> RetrievalTrainConfig -> build_loss / USERModel -> loss value

EMBED, REGION_DIM, VOCAB, QUEUE = 6, 5, 20, 6
# the model's shape comes from overrides, the loss constants from the YAML file (both paths of load_config)
MODEL_OVERRIDES = [f"model.embed_dim={EMBED}", f"model.region_dim={REGION_DIM}", "model.text_encoder=bigru",
                   "model.word_dim=4", "model.sge_dropout=0.0", f"model.queue_size={QUEUE}", "model.use_queue=true"]
MU, GAMMA, MARGIN, WARMUP = 6.0, 0.25, 0.3, 2
LOSS_YAML = f"""
loss:
  name: uto
  mu: {MU}
  gamma: {GAMMA}
  batch_weight: {{batch_weight}}
  margin: {MARGIN}
  warmup_epochs: 0
  uto_warmup_epochs: {{uto_warmup}}
"""
BATCH_IDS = [3, 3, 8]  # two captions of image 3: each other's positives, never negatives
QUEUE_IDS = [8, 5, 3, 9]  # 4 of 6 slots filled; slots 0 and 2 hold keys of the batch's own images


def retrieval_config(tmp_path: Path, batch_weight: float, mode: str, uto_warmup: int = 0) -> RetrievalTrainConfig:
    """A config whose loss section is read from a YAML file and whose queue rule is a ``--set`` override."""
    path = tmp_path / "run.yaml"
    path.write_text(LOSS_YAML.format(batch_weight=batch_weight, uto_warmup=uto_warmup))
    return load_config(RetrievalTrainConfig, path, MODEL_OVERRIDES + [f"loss.queue_false_negatives={mode}"])


def model_and_batch(cfg: RetrievalTrainConfig) -> tuple[USERModel, dict[str, torch.Tensor]]:
    """A tiny USER model in eval mode with key encoders unlike the online ones and a partly filled queue."""
    torch.manual_seed(0)
    model = USERModel(cfg.model, cfg.loss, vocab_size=VOCAB).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # keys must not equal the online embeddings, or a model using those would pass
        for p in list(model.image_key_encoder.parameters()) + list(model.text_key_encoder.parameters()):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    n = len(QUEUE_IDS)
    model.image_queue.enqueue(F.normalize(torch.randn(n, EMBED, generator=gen), dim=1), torch.tensor(QUEUE_IDS))
    model.text_queue.enqueue(F.normalize(torch.randn(n, EMBED, generator=gen), dim=1), torch.tensor(QUEUE_IDS))
    b = len(BATCH_IDS)
    batch = {
        "regions": torch.randn(b, 4, REGION_DIM, generator=gen),
        "region_lengths": torch.tensor([4, 3, 4]),
        "tokens": torch.randint(5, VOCAB, (b, 5), generator=gen),
        "token_lengths": torch.tensor([5, 5, 5]),
        "image_ids": torch.tensor(BATCH_IDS),
    }
    return model, batch


def embeddings(model: USERModel, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Online and key embeddings of the batch and the queue contents, as float64 arrays."""
    with torch.no_grad():
        out = {
            "img": model.encode_images(batch["regions"], batch["region_lengths"]),
            "txt": model.encode_texts(batch["tokens"], batch["token_lengths"]),
            "img_key": model.image_key_encoder(batch["regions"], batch["region_lengths"]),
            "txt_key": model.text_key_encoder(batch["tokens"], batch["token_lengths"]),
            "img_queue": model.image_queue.keys, "txt_queue": model.text_queue.keys,
        }
    return {k: v.double().numpy() for k, v in out.items()}


def lse0(x: list[float]) -> float:
    """log(1 + sum_k exp(x_k)), stable."""
    m = max([0.0] + x)
    return m + math.log(math.exp(-m) + sum(math.exp(v - m) for v in x))


def queue_negative(b: int, k: int, mode: str) -> bool:
    """Whether queue slot k is a negative of query b (empty slots never are)."""
    return k < len(QUEUE_IDS) and (mode == "keep" or QUEUE_IDS[k] != BATCH_IDS[b])


def uto_by_hand(e: dict[str, np.ndarray], mu: float, gamma: float, batch_weight: float, mode: str) -> float:
    """USER's UTO: batch_weight * batch + queue_i2t + queue_t2i (``retrieval_losses`` docstring)."""
    img, txt, ids = e["img"], e["txt"], BATCH_IDS
    s = img @ txt.T
    b = len(ids)
    i2t = sum(lse0([mu * (s[i, j] - gamma) for j in range(b) if ids[j] != ids[i]]) / mu for i in range(b)) / b
    t2i = sum(lse0([mu * (s[i, j] - gamma) for i in range(b) if ids[i] != ids[j]]) / mu for j in range(b)) / b
    positive = sum(math.log(1 + max(s[i, i], 0.0)) for i in range(b)) / b

    def queue(query: np.ndarray, keys: np.ndarray, paired_key: np.ndarray) -> float:
        total = 0.0
        for q in range(b):
            negatives = [mu * (query[q] @ keys[k] - gamma) for k in range(QUEUE) if queue_negative(q, k, mode)]
            total += lse0(negatives) / mu - math.log(1 + max(query[q] @ paired_key[q], 0.0))
        return total / b

    return (batch_weight * (i2t + t2i - positive) + queue(img, e["txt_queue"], e["txt_key"])
            + queue(txt, e["img_queue"], e["img_key"]))


def hinge_sum_by_hand(e: dict[str, np.ndarray], margin: float, batch_weight: float, mode: str) -> float:
    """VSE++ sum of violations, summed over queries: batch_weight * batch + both queue directions."""
    img, txt, ids = e["img"], e["txt"], BATCH_IDS
    s = img @ txt.T
    b = len(ids)
    batch = sum(max(0.0, margin + s[i, j] - s[i, i]) + max(0.0, margin + s[j, i] - s[i, i])
                for i in range(b) for j in range(b) if ids[i] != ids[j])

    def queue(query: np.ndarray, keys: np.ndarray, paired_key: np.ndarray) -> float:
        return sum(max(0.0, margin + query[q] @ keys[k] - query[q] @ paired_key[q])
                   for q in range(b) for k in range(QUEUE) if queue_negative(q, k, mode))

    return batch_weight * batch + queue(img, e["txt_queue"], e["txt_key"]) + queue(txt, e["img_queue"], e["img_key"])


def model_loss(model: USERModel, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(model(batch)["loss"])


@pytest.mark.parametrize("batch_weight, mode", [(2.5, "mask"), (1.0, "keep"), (2.5, "keep")])
def test_uto_constants_from_yaml_reach_the_model_loss(tmp_path: Path, batch_weight: float, mode: str) -> None:
    cfg = retrieval_config(tmp_path, batch_weight, mode)
    model, batch = model_and_batch(cfg)
    e = embeddings(model, batch)
    expected = uto_by_hand(e, MU, GAMMA, batch_weight, mode)
    # the inputs separate the constants: any one of them at its default gives another value
    other_mode = "keep" if mode == "mask" else "mask"
    for wrong in (uto_by_hand(e, 90.0, GAMMA, batch_weight, mode), uto_by_hand(e, MU, 0.5, batch_weight, mode),
                  uto_by_hand(e, MU, GAMMA, batch_weight + 1.0, mode),
                  uto_by_hand(e, MU, GAMMA, batch_weight, other_mode)):
        assert abs(wrong - expected) > 1e-3
    assert model_loss(model, batch) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_uto_warmup_epochs_from_yaml_run_the_hinge_then_uto(tmp_path: Path) -> None:
    batch_weight, mode = 1.5, "keep"
    cfg = retrieval_config(tmp_path, batch_weight, mode, uto_warmup=WARMUP)
    model, batch = model_and_batch(cfg)
    e = embeddings(model, batch)
    hinge = hinge_sum_by_hand(e, MARGIN, batch_weight, mode)
    uto = uto_by_hand(e, MU, GAMMA, batch_weight, mode)
    assert abs(hinge - uto) > 1e-3
    for epoch in range(WARMUP):  # the sum of violations throughout the warm-up (not hardest-negative)
        model.set_epoch(epoch)
        assert model_loss(model, batch) == pytest.approx(hinge, rel=1e-5, abs=1e-6), epoch
    model.set_epoch(WARMUP)
    assert model_loss(model, batch) == pytest.approx(uto, rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# (b) every shipped config loads the values its file holds

SHIPPED = ["coco_user", "distill_nuscenes", "distill_semantickitti", "distill_synthetic", "f30k_user",
           "flickr8k_locked", "flickr8k_locked_tolerant", "flickr8k_user", "shapes_user", "shapes_user_cge",
           "shapes_user_cge_tolerant", "shapes_vsepp"]
# files whose every value equals the dataclass default: the differ-from-default check cannot hold for them
# (test_shipped_config_perturbed_copy_loads_the_copy covers the loader instead); keep this list exact
MIRRORS_DEFAULTS: set[str] = set()
CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))


def config_class(path: Path) -> type:
    """The dataclass a shipped config file instantiates (by file name prefix)."""
    return DistillConfig if path.stem.startswith("distill_") else RetrievalTrainConfig


def leaves(mapping: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(dotted key path, value) of every non-mapping value of a nested YAML mapping."""
    out = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            out += leaves(value, prefix + (key,))
        else:
            out.append((prefix + (key,), value))
    return out


def lookup(data: dict, key: tuple[str, ...]) -> Any:
    for part in key:
        assert isinstance(data, dict) and part in data, f"{'.'.join(key)} missing from the loaded config"
        data = data[part]
    return data


def same(loaded: Any, written: Any) -> bool:
    """Equal, with bools never equal to numbers (True == 1 in Python) and ints allowed to widen to floats."""
    if isinstance(written, bool) or isinstance(loaded, bool):
        return type(written) is type(loaded) and written == loaded
    if isinstance(written, list):
        return isinstance(loaded, list) and len(loaded) == len(written) and all(map(same, loaded, written))
    return loaded == written


def own_values(written: dict) -> dict:
    """A config file's own values: all its keys but ``base`` (the file it overlays, which is checked on its own)."""
    return {key: value for key, value in written.items() if key != BASE_KEY}


def assert_loads_file_values(cls: type, path: Path, written: dict) -> None:
    loaded = config_to_dict(load_config(cls, path))
    keys = leaves(own_values(written))
    assert keys, f"{path} holds no values"
    for key, value in keys:
        got = lookup(loaded, key)
        assert same(got, value), f"{path.name}: {'.'.join(key)} is {got!r}, the file says {value!r}"


def test_the_shipped_configs_are_the_known_ones() -> None:
    """A new or renamed config file must be added to SHIPPED (and so to the checks below)."""
    assert [p.stem for p in CONFIG_FILES] == sorted(SHIPPED)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_shipped_config_loads_every_value_of_its_file(path: Path) -> None:
    assert_loads_file_values(config_class(path), path, yaml.safe_load(path.read_text()))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_shipped_config_differs_from_the_defaults(path: Path) -> None:
    cls = config_class(path)
    loaded, defaults = config_to_dict(load_config(cls, path)), config_to_dict(cls())
    differing = [k for k, _ in leaves(own_values(yaml.safe_load(path.read_text())))
                 if not same(lookup(loaded, k), lookup(defaults, k))]
    if path.stem in MIRRORS_DEFAULTS:
        assert not differing, f"{path.name} now sets {differing}: remove it from MIRRORS_DEFAULTS"
    else:
        assert differing, f"{path.name} sets only default values, so it cannot show that the file is read"


def perturb(value: Any) -> Any:
    """Another value of the same type (numbers, bools, lists of numbers) that stays in range (a fraction stays a
    fraction); strings and None stay."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        if value == 0.0:
            return 0.25
        return value * 0.5 if -1.0 <= value <= 1.0 else value + 0.5
    if isinstance(value, list):
        return [perturb(v) for v in value]
    if isinstance(value, dict):
        return {k: perturb(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_shipped_config_perturbed_copy_loads_the_copy(path: Path, tmp_path: Path) -> None:
    """The same keys with other numbers and flags load as written (covers files that mirror the defaults)."""
    written = perturb(yaml.safe_load(path.read_text()))
    if written.get("loss", {}).get("semantic_source") == "clip" and not written["model"].get("cge"):
        written["loss"]["semantic_source"] = "regions"  # the CLIP similarities exist only with CGE on (a rule)
    copy = tmp_path / path.name
    copy.write_text(yaml.safe_dump(written))
    assert_loads_file_values(config_class(path), copy, written)


# ----------------------------------------------------------------------------------------------------------------
# (c) ST-SLidR with tolerance and balancing: one pretraining step's loss by hand

TINY_DISTILL = [
    "data.pretrain_scenes=2", "data.probe_train_scenes=1", "data.eval_scenes=1", "data.num_points=1500",
    "data.image_size=[32,64]", "voxel.widths=[4,8]", "voxel.out_dim=8", "voxel.voxel_size=0.2",
    "image.backbone=resnet18", "image.weights=null", "image.resnet_width=8", "superpixels.n_segments=12",
    "run.device=cpu",
]
Q, THRESHOLD = 0.3, 0.6


def pooled_by_hand(scenes: list, head: Any, net: Any, cache: SuperpixelCache,
                   cfg: DistillConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per used superpixel: mean point feature f, mean pixel feature g, mean upsampled backbone feature z."""
    point_features = net(voxelize_scenes([scene_points(s, torch.device("cpu")) for s in scenes],
                                                  cfg.voxel, None))
    f_rows, g_rows, z_rows = [], [], []
    offset = 0
    for scene in scenes:
        for camera in scene.cameras:
            uv, mask = project_points(scene.points[:, :3], camera.lidar_to_image, camera.image_hw)
            cols, rows = np.rint(uv[mask]).astype(int).T
            sp = cache(camera.image)
            point_sp = sp[rows, cols]
            m = head.backbone_map(torch.from_numpy(camera.image)[None])
            pixels = head.pixel_features(m, camera.image_hw)[0]
            upsampled = F.interpolate(m, size=camera.image_hw, mode="bilinear")[0]
            for s in sorted(set(point_sp.tolist())):
                members = offset + np.flatnonzero(mask)[point_sp == s]
                region = torch.from_numpy(sp == s)
                f_rows.append(point_features[torch.from_numpy(members)].mean(0))
                g_rows.append(pixels[:, region].mean(1))
                z_rows.append(upsampled[:, region].mean(1))
        offset += scene.num_points
    return tuple(torch.stack(r).double().numpy() for r in (f_rows, g_rows, z_rows))


def st_slidr_by_hand(f: np.ndarray, g: np.ndarray, z: np.ndarray, tau: float, q: float, threshold: float,
                     variant: str) -> tuple[float, int, list[float]]:
    """Loss, number of dropped negatives, balance weights: quantile tolerance plus class-agnostic balancing."""
    k = len(f)
    zn = [row / math.sqrt(sum(v * v for v in row)) for row in z]
    s = [[float(sum(a * b for a, b in zip(zn[i], zn[j]))) for j in range(k)] for i in range(k)]
    dropped = 0
    per_anchor = []
    for i in range(k):
        d = {j: 1.0 - min(max(s[i][j], 0.0), 1.0) for j in range(k) if j != i}
        cut = float(np.quantile(np.array(list(d.values())), q))
        x = [float(f[i] @ g[j]) / tau for j in range(k)]
        denominator = math.exp(x[i])  # the positive is never dropped
        for j, dij in d.items():
            if dij < cut:
                dropped += 1
                denominator += 1.0 if variant == "authors" else 0.0  # authors: logit * 0 -> exp(0)
            else:
                denominator += math.exp(x[j])
        per_anchor.append(math.log(denominator) - x[i])
    votes = [sum(s[i][j] for j in range(k) if s[i][j] >= threshold) for i in range(k)]
    low, high = min(votes), max(votes)
    weights = [1.0 - (v - low) / (high - low) for v in votes]
    loss = sum(a * l for a, l in zip(weights, per_anchor)) / sum(weights)
    return loss, dropped, weights


def test_tolerant_balanced_distillation_loss_matches_hand_computation(tmp_path: Path) -> None:
    cfg = load_config(DistillConfig, None, TINY_DISTILL + ["loss.tolerance=quantile", "loss.balance=true",
                                                          f"loss.q={Q}", f"loss.threshold={THRESHOLD}"])
    torch.manual_seed(0)
    net = build_voxel_net(cfg.voxel).eval()
    head = build_image_head(cfg)
    scenes = load_scenes(cfg.data, "pretrain")
    cache = SuperpixelCache(tmp_path, n_segments=12)
    prepared = [prepare_scene(s, head, cache, torch.device("cpu"), with_semantic=True) for s in scenes]
    with torch.no_grad():
        f, g, z = pooled_by_hand(scenes, head, net, cache, cfg)
    for variant in ("remove", "authors"):
        cfg.loss.quantile_variant = variant
        with torch.no_grad():
            loss, k = distillation_loss(net, head, build_distill_loss(cfg), prepared, cfg.voxel, None)
        expected, dropped, weights = st_slidr_by_hand(f, g, z, cfg.loss.tau, Q, THRESHOLD, variant)
        plain, _, _ = st_slidr_by_hand(f, g, z, cfg.loss.tau, 0.0, THRESHOLD, variant)  # q = 0 drops nothing
        assert k == len(f)
        assert dropped > 0 and abs(plain - expected) > 1e-3  # the tolerance acts on this batch
        for wrong_q, wrong_threshold in ((0.01, THRESHOLD), (Q, 0.5)):  # the defaults give other values
            wrong, _, _ = st_slidr_by_hand(f, g, z, cfg.loss.tau, wrong_q, wrong_threshold, variant)
            assert abs(wrong - expected) > 1e-3
        assert min(weights) == 0.0 and max(weights) == 1.0 and len(set(weights)) > 2  # balancing acts too
        assert float(loss) == pytest.approx(expected, rel=1e-4), variant

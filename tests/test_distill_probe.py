"""IoU / mIoU against hand counts, label-fraction selection, BatchNorm recalibration, and the probe end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xmcl.config import load_config
from xmcl.distill.config import DistillConfig, VoxelConfig
from xmcl.distill.networks import build_voxel_net
from xmcl.distill.probe import recalibrate_batchnorm, select_labels
from xmcl.distill.scene import Scene
from xmcl.distill.segmentation_loss import cross_entropy_lovasz, lovasz_softmax
from xmcl.errors import ConfigError, DataError
from xmcl.metrics.segmentation import authors_mean_iou, confusion_matrix, mean_iou, segmentation_scores
from xmcl.training.probe_trainer import run_probe


def test_iou_and_miou_match_hand_counts() -> None:
    target = torch.tensor([0, 0, 1, 1, 2, -1, 0, 1])
    pred = torch.tensor([0, 1, 1, 1, 0, 3, 0, 2])
    conf = confusion_matrix(pred, target, 4)
    # kept (truth, prediction): (0,0) x2, (0,1), (1,1) x2, (1,2), (2,0); the ignored point predicted 3 is dropped
    # class 0: TP 2, FP 1 (2->0), FN 1 (0->1) -> 2/4; class 1: TP 2, FP 1, FN 1 -> 2/4; class 2: TP 0 -> 0/2;
    # class 3: neither labelled nor predicted -> undefined, left out of the mean
    scores = segmentation_scores(conf, ("a", "b", "c", "d"))
    assert scores["iou"] == {"a": 0.5, "b": 0.5, "c": 0.0, "d": None}
    assert scores["miou"] == pytest.approx(1 / 3)
    assert scores["accuracy"] == pytest.approx(4 / 7) and scores["points"] == 7
    # a class predicted but absent from the labels counts with IoU 0
    assert mean_iou(confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), 3)) == pytest.approx((0.5 + 0) / 2)


def test_confusion_matrix_rejects_out_of_range_labels() -> None:
    with pytest.raises(DataError, match="label 5"):
        confusion_matrix(torch.tensor([0]), torch.tensor([5]), 3)


def _fake_scene(n: int, seed: int) -> Scene:
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, 3, n)
    return Scene(points=rng.normal(size=(n, 4)), cameras=[], labels=labels, class_names=("a", "b", "c"))


def test_label_fraction_by_scenes_points_and_skip() -> None:
    scenes = [_fake_scene(2000, i) for i in range(4)]
    by_scene = select_labels(scenes, 0.5, "scenes", seed=0)
    assert len(by_scene.indices) == 2 and len(set(by_scene.indices)) == 2
    assert all(by_scene.labels(i, scenes[i]) is scenes[i].labels for i in by_scene.indices)
    assert len(select_labels(scenes, 0.01, "scenes", seed=0).indices) == 1
    by_point = select_labels(scenes, 0.3, "points", seed=0)
    assert by_point.indices == [0, 1, 2, 3]
    for i, scene in enumerate(scenes):
        labels = by_point.labels(i, scene)
        kept = labels >= 0
        assert np.array_equal(labels[kept], scene.labels[kept])
        share = kept.sum() / (scene.labels >= 0).sum()
        assert 0.25 < share < 0.35
        assert np.array_equal(labels, by_point.labels(i, scene))  # the same points on every read
    # the authors' rule: fraction 1/k keeps scans 0, k, 2k, ... (their SemanticKITTI loader's files[::k])
    many = [_fake_scene(10, i) for i in range(250)]
    assert select_labels(many, 0.01, "skip", seed=0).indices == [0, 100, 200]
    assert select_labels(many, 0.1, "skip", seed=3).indices == list(range(0, 250, 10))
    assert select_labels(many, 1.0, "skip", seed=0).indices == list(range(250))
    with pytest.raises(ConfigError, match="label fraction"):
        select_labels(scenes, 0.0, "scenes", seed=0)


def test_batchnorm_recalibration_uses_the_batch_statistics() -> None:
    torch.manual_seed(0)
    cfg = VoxelConfig(voxel_size=0.3, widths=[4, 8], out_dim=4)
    net = build_voxel_net(cfg)
    gen = torch.Generator().manual_seed(1)
    clouds = [torch.randn(500, 4, generator=gen) * 3 for _ in range(2)]
    captured = []
    net.stem[0].register_forward_hook(lambda module, inputs, output: captured.append(output.features.detach()))
    recalibrate_batchnorm(net, clouds, cfg, batch_scenes=2)
    stem_out = captured[0]
    norm = net.stem[1].norm
    torch.testing.assert_close(norm.running_mean, stem_out.mean(0))
    torch.testing.assert_close(norm.running_var, stem_out.var(0, unbiased=True))
    assert not net.training and norm.momentum == 0.1


def test_probe_without_checkpoint_finetunes_a_random_network(tmp_path: Path) -> None:
    cfg = load_config(DistillConfig, None, [
        "data.probe_train_scenes=2", "data.eval_scenes=1", "data.num_points=1500", "data.image_size=[16,32]",
        "voxel.widths=[4,8]", "voxel.voxel_size=0.2", "probe.finetune_steps=3", "probe.batch_scenes=2",
        "run.progress=false", "run.device=cpu"])
    result = run_probe(cfg, None, tmp_path, mode="finetune", label_fraction=0.5)
    assert result["train_scenes"] == 1 and result["checkpoint"] is None
    defined = [v for v in result["iou"].values() if v is not None]
    assert all(0.0 <= v <= 1.0 for v in defined)
    assert result["miou"] == pytest.approx(sum(defined) / len(defined))
    assert json.loads((tmp_path / "probe_finetune.json").read_text())["points"] == result["points"] > 0
    with pytest.raises(ConfigError, match="mode"):
        run_probe(cfg, None, tmp_path, mode="knn")


def test_authors_mean_iou_counts_absent_classes_as_one() -> None:
    target = torch.tensor([0, 0, 1, 1, 2, -1])
    pred = torch.tensor([0, 1, 1, 1, 0, 3])
    conf = confusion_matrix(pred, target, 4)
    # class 0: 1/3, class 1: 2/3, class 2: 0/2, class 3 (neither labelled nor predicted): 1 in SLidR's figure
    assert authors_mean_iou(conf) == pytest.approx((1 / 3 + 2 / 3 + 0 + 1) / 4)
    assert mean_iou(conf) == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert segmentation_scores(conf, ("a", "b", "c", "d"))["miou_authors"] == pytest.approx(0.5)


def _lovasz_by_sets(probas: torch.Tensor, labels: torch.Tensor) -> float:
    """The Lovasz extension of the Jaccard loss, by its definition over growing sets of the sorted points:
    sum_k e_(k) * (Delta(S_k) - Delta(S_{k-1})), Delta(S) = 1 - |F minus S| / |F union S|, averaged over classes."""
    losses = []
    for c in sorted(set(labels.tolist())):
        fg = {i for i, y in enumerate(labels.tolist()) if y == c}
        errors = [abs((1.0 if i in fg else 0.0) - float(probas[i, c])) for i in range(len(labels))]
        order = sorted(range(len(errors)), key=lambda i: -errors[i])
        total, chosen, previous = 0.0, set(), 0.0
        for i in order:
            chosen.add(i)
            delta = 1.0 - len(fg - chosen) / len(fg | chosen)
            total += errors[i] * (delta - previous)
            previous = delta
        losses.append(total)
    return sum(losses) / len(losses)


def test_lovasz_softmax_is_the_lovasz_extension_and_one_minus_iou_at_hard_predictions() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(4, (40,), generator=gen)
    probas = torch.softmax(torch.randn(40, 5, generator=gen, dtype=torch.float64), dim=1)
    assert float(lovasz_softmax(probas, labels)) == pytest.approx(_lovasz_by_sets(probas, labels), rel=1e-9)
    hard = torch.randint(5, (40,), generator=gen)
    one_hot = F.one_hot(hard, 5).double()
    ious = []
    for c in torch.unique(labels).tolist():
        inter = int(((hard == c) & (labels == c)).sum())
        union = int(((hard == c) | (labels == c)).sum())
        ious.append(inter / union)
    assert float(lovasz_softmax(one_hot, labels)) == pytest.approx(1 - sum(ious) / len(ious), rel=1e-12)
    logits = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    with_ignored = torch.where(torch.arange(40) % 4 == 0, -1, labels)
    keep = with_ignored >= 0
    expected = F.cross_entropy(logits[keep], labels[keep]) + _lovasz_by_sets(logits[keep].softmax(1), labels[keep])
    assert float(cross_entropy_lovasz(logits, with_ignored)) == pytest.approx(float(expected), rel=1e-9)


def _tiny_probe(extra: list[str]) -> DistillConfig:
    return load_config(DistillConfig, None, [
        "data.probe_train_scenes=3", "data.eval_scenes=1", "data.num_points=1500", "data.image_size=[16,32]",
        "voxel.widths=[4,8]", "voxel.voxel_size=0.2", "probe.batch_scenes=2", "probe.epochs=3",
        "probe.protocol=authors", "run.progress=false", "run.device=cpu"] + extra)


def test_authors_linear_probe_trains_only_the_last_layer_with_frozen_batchnorm(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import xmcl.training.probe_trainer as probe_module

    cfg = _tiny_probe(["probe.label_unit=skip"])
    torch.manual_seed(cfg.probe.seed)  # run_probe seeds the same way before building the network
    before = {k: v.clone() for k, v in build_voxel_net(cfg.voxel).state_dict().items()}
    trained = {}
    original = probe_module._train_authors

    def keep_network(net, classifier, *args):
        trained.update(net=net, head=classifier.weight.detach().clone())
        original(net, classifier, *args)
        trained["head_after"] = classifier.weight.detach().clone()

    monkeypatch.setattr(probe_module, "_train_authors", keep_network)
    result = run_probe(cfg, None, tmp_path, mode="linear", label_fraction=1.0)
    after = trained["net"].state_dict()
    for key, value in before.items():  # weights and BatchNorm running statistics alike
        assert torch.equal(after[key], value), key
    assert not torch.equal(trained["head"], trained["head_after"])  # the last layer did train
    assert result["protocol"] == "authors" and result["train_scenes"] == 3
    assert 0.0 <= result["miou_authors"] <= 1.0
    assert (tmp_path / "probe_linear_authors.json").is_file()
    tuned = run_probe(_tiny_probe([]), None, tmp_path, mode="finetune", label_fraction=1.0)
    assert tuned["protocol"] == "authors" and (tmp_path / "probe_finetune_authors.json").is_file()
    changed = [k for k, v in before.items() if not torch.equal(trained["net"].state_dict()[k], v)]
    assert changed  # fine-tuning moves the backbone

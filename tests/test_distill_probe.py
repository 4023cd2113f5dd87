"""IoU / mIoU against hand counts, label-fraction selection, BatchNorm recalibration, and the probe end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xmcl.config import load_config
from xmcl.distill.config import DistillConfig, VoxelConfig
from xmcl.distill.networks import build_voxel_net
from xmcl.distill.probe import recalibrate_batchnorm, run_probe, select_labels
from xmcl.distill.scene import Scene
from xmcl.errors import ConfigError, DataError
from xmcl.metrics.segmentation import confusion_matrix, mean_iou, segmentation_scores


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

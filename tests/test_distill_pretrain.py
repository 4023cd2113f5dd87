"""Pretraining wiring against hand-made pooling and InfoNCE, exact resume, and a tiny pretrain -> resume -> probe."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import xmcl.training.distill_trainer as trainer
from xmcl.distill import networks, objective, preparation
from xmcl.distill.geometry import project_points
from xmcl.distill.superpixels import SuperpixelCache
from xmcl.errors import CheckpointError, TrainingDiverged
from xmcl.runtime.checkpoint import read_checkpoint
from xmcl.runtime.log import read_jsonl
from xmcl.training.probe_trainer import run_probe

from helpers import assert_resumed_weights, distill_config

def test_batches_cover_each_scene_once_per_epoch() -> None:
    seen = [i for step in range(3) for i in preparation.batch_indices(7, 2, seed=5, step=step)]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 6  # 3 disjoint pairs; the 7th scene waits
    second = [i for step in range(3, 6) for i in preparation.batch_indices(7, 2, seed=5, step=step)]
    assert len(set(second)) == 6


def test_distillation_loss_matches_pooling_and_infonce_by_hand(tmp_path: Path) -> None:
    cfg = distill_config("loss.tolerance=none", "loss.balance=false")
    torch.manual_seed(0)
    net = networks.build_voxel_net(cfg.voxel).eval()
    head = networks.build_image_head(cfg)
    scenes = preparation.load_scenes(cfg.data, "pretrain")[:2]
    cache = SuperpixelCache(tmp_path, n_segments=12)
    prepared = [preparation.prepare_scene(s, head, cache, torch.device("cpu"), with_semantic=True) for s in scenes]
    loss, k = objective.distillation_loss(net, head, objective.build_distill_loss(cfg), prepared, cfg.voxel, None)

    with torch.no_grad():
        point_features = net(preparation.voxelize_scenes([p.points for p in prepared], cfg.voxel, None))
        f_rows, g_rows, z_rows, used = [], [], [], []
        offset = sp_offset = 0
        for scene in scenes:
            for camera in scene.cameras:
                uv, mask = project_points(scene.points[:, :3], camera.lidar_to_image, camera.image_hw)
                cols, rows = np.rint(uv[mask]).astype(int).T
                sp = cache(camera.image)
                point_sp = sp[rows, cols]
                m = head.backbone_map(torch.from_numpy(camera.image)[None])
                pixels = head.pixel_features(m, camera.image_hw)[0]
                upsampled = torch.nn.functional.interpolate(m, size=camera.image_hw, mode="bilinear")[0]
                for s in sorted(set(point_sp.tolist())):
                    members = offset + np.flatnonzero(mask)[point_sp == s]
                    f_rows.append(point_features[torch.from_numpy(members)].mean(0))
                    region = torch.from_numpy(sp == s)
                    g_rows.append(pixels[:, region].mean(1))
                    z_rows.append(upsampled[:, region].mean(1))
                    used.append(sp_offset + s)
                sp_offset += int(sp.max()) + 1
            offset += scene.num_points
        f, g = torch.stack(f_rows), torch.stack(g_rows)
        logits = f @ g.T / cfg.loss.tau
        expected = (torch.logsumexp(logits, 1) - logits.diagonal()).mean()
    assert k == len(f_rows)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    semantic = torch.cat([p.semantic for p in prepared])
    torch.testing.assert_close(semantic[used], torch.stack(z_rows), rtol=1e-4, atol=1e-5)


def _weights(path: Path) -> dict:
    return read_checkpoint(path)["voxel_net"]


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_and_probe_reads_it(tmp_path: Path, monkeypatch) -> None:
    cfg = distill_config(f"superpixels.cache_dir={tmp_path / 'sp'}")
    straight = trainer.pretrain_distill(cfg, tmp_path / "straight")

    real_loss, calls = trainer.distillation_loss, {"n": 0}

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "distillation_loss", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        trainer.pretrain_distill(cfg, tmp_path / "resumed")
    assert read_checkpoint(tmp_path / "resumed" / "last.pt")["global_step"] == 2
    monkeypatch.setattr(trainer, "distillation_loss", real_loss)
    resumed = trainer.pretrain_distill(cfg, tmp_path / "resumed", resume=True)

    assert_resumed_weights(_weights(straight), _weights(resumed))
    steps = [r["step"] for r in read_jsonl(tmp_path / "resumed" / "log.jsonl")]
    assert steps == [1, 2, 3, 4]
    assert (tmp_path / "straight" / "curves.png").is_file()

    result = run_probe(cfg, resumed, tmp_path / "probe", mode="linear", label_fraction=1.0)
    defined = [v for v in result["iou"].values() if v is not None]
    assert result["miou"] == pytest.approx(sum(defined) / len(defined))
    assert json.loads((tmp_path / "probe" / "probe_linear.json").read_text())["miou"] == result["miou"]


def test_resume_refuses_a_different_network(tmp_path: Path) -> None:
    cfg = distill_config("optim.steps=1", f"superpixels.cache_dir={tmp_path / 'sp'}")
    trainer.pretrain_distill(cfg, tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"voxel.widths: \[4, 8\] -> \[4, 4\]"):
        trainer.pretrain_distill(distill_config("optim.steps=2", "voxel.widths=[4,4]"), tmp_path / "run")


def test_non_finite_loss_stops_the_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(trainer, "distillation_loss", lambda *a, **k: (torch.tensor(math.nan, requires_grad=True), 1))
    with pytest.raises(TrainingDiverged, match=r"loss became nan at steps? 1(-\d+)?; training stopped"):
        trainer.pretrain_distill(distill_config(f"superpixels.cache_dir={tmp_path / 'sp'}"), tmp_path / "run")

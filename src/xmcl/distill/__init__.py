"""ST-SLidR image-to-point distillation, as a library (its loops: ``xmcl.training.distill_trainer`` and
``xmcl.training.probe_trainer``).

* :mod:`.config`: the typed ``DistillConfig`` of pretraining and the probe.
* :mod:`.scene`: the ``Scene`` / ``CameraView`` contract and the raw point-file and image loaders.
* :mod:`.geometry`: rigid transforms, calibration chains, the lidar-to-pixel projection.
* :mod:`.readers`: the readers of KITTI, SemanticKITTI, nuScenes, nuScenes-lidarseg; the source switch ``open_scans``.
* :mod:`.scanset`: ``ScanSet``, the lazy scans of one split with the authors' label-fraction rule.
* :mod:`.synthetic`: the built-in ray-cast driving scenes.
* :mod:`.superpixels`: SLIC superpixels and their disk cache.
* :mod:`.augment`: the authors' augmentations of points, images, superpixels and pairs.
* :mod:`.preparation`: the scans of a split as per-step inputs, the scan order, voxelisation.
* :mod:`.pooling`: superpixel pooling as one sparse matrix product per side.
* :mod:`.image_head`: the frozen 2D backbone under a trainable 1x1 head.
* :mod:`.voxel_net`: the sparse U-Net walk both 3D networks share, ``VoxelUNet`` and ``voxelize_clouds``.
* :mod:`.res16unet`: the authors' Res16UNet.
* :mod:`.networks`: the networks a config describes and the pretraining checkpoint of the 3D one.
* :mod:`.objective`: the distillation loss of one batch.
* :mod:`.segmentation_loss`: the authors' downstream loss, cross-entropy + Lovasz-softmax.
* :mod:`.probe`: the probe's library pieces: label selection, BatchNorm re-estimation, scoring, the result table.

Only the contract and projection are re-exported here so that importing the package stays cheap; import the
readers and generators from their modules.
"""

from xmcl.distill.geometry import point_pixel_pairs, project_points
from xmcl.distill.scene import CameraView, Scene

__all__ = ["CameraView", "Scene", "point_pixel_pairs", "project_points"]

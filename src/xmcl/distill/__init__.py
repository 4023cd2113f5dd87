"""ST-SLidR image-to-point distillation.

Data side: :mod:`.scene` (the ``Scene`` / ``CameraView`` contract), :mod:`.geometry`
(calibration chains, projection), :mod:`.readers` (readers of the real formats and the source
switch), :mod:`.synthetic` (built-in driving scenes), :mod:`.superpixels` (SLIC + disk cache).
Only the contract and projection are re-exported here so that importing the package stays
cheap; import the readers and generators from their modules.
"""

from xmcl.distill.geometry import point_pixel_pairs, project_points
from xmcl.distill.scene import CameraView, Scene

__all__ = ["CameraView", "Scene", "point_pixel_pairs", "project_points"]

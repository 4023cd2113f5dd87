"""Readers of the real lidar + camera formats, each returning ``Scene``s, and the switch from ``data.source`` to
the scans of a split.

* :mod:`.kitti`: the KITTI object layout (velodyne, image_2, calib, label_2).
* :mod:`.semantickitti`: SemanticKITTI sequences with their point labels and the 19 benchmark classes.
* :mod:`.nuscenes`: nuScenes keyframes from the devkit's JSON tables.
* :mod:`.nuscenes_lidarseg`: nuScenes-lidarseg point labels, the 16 challenge classes and SLidR's scene splits.
* :mod:`.sources`: ``open_scans(data, split)``, the scans of a split whatever ``data.source`` is.
"""

"""Evaluation metrics of both systems: retrieval recall (``retrieval``) and 3D segmentation IoU
(``segmentation``). They take arrays and tensors, never files or models."""

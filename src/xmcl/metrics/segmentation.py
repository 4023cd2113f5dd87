"""Semantic segmentation scores from a confusion matrix: per-class IoU and mIoU.

``conf[t, p]`` counts points of ground-truth class t predicted as class p (points labelled ``ignore_index`` are left
out). ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` with ``TP_c = conf[c, c]``, ``FP_c = sum_t conf[t, c] - TP_c``,
``FN_c = sum_p conf[c, p] - TP_c``. A class absent from both the ground truth and the predictions has 0 / 0: its IoU
is undefined (NaN, reported as None) and it is excluded from the mean, so ``mIoU`` is the mean over the classes that
occur in the evaluated points or are predicted there. A class that is predicted but absent from the ground truth
has IoU 0 and counts.

The authors' figure (SLidR's ``compute_IoU_from_cmatrix``, ``authors_mean_iou``) differs only there: a class absent
from both counts as IoU 1, and the mean runs over all C classes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from xmcl.errors import DataError


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = -1) -> Tensor:
    """(num_classes, num_classes) int64, rows = ground truth, columns = prediction."""
    if pred.shape != target.shape:
        raise DataError(f"predictions {tuple(pred.shape)} and labels {tuple(target.shape)} differ in shape")
    keep = target != ignore_index
    pred, target = pred[keep].long(), target[keep].long()
    for name, values in (("label", target), ("prediction", pred)):
        bad = (values < 0) | (values >= num_classes)
        if bad.any():
            raise DataError(f"{name} {int(values[bad][0])} is outside the {num_classes} classes "
                            f"(and {ignore_index} = ignore)")
    flat = target * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def iou_per_class(conf: Tensor) -> Tensor:
    """(C,) float64 IoU of each class; NaN where the class is absent from ground truth and predictions."""
    conf = conf.double()
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))


def mean_iou(conf: Tensor) -> float:
    """Mean of the defined per-class IoUs (NaN if no class is defined, i.e. no evaluated point)."""
    iou = iou_per_class(conf)
    defined = ~torch.isnan(iou)
    return float(iou[defined].mean()) if defined.any() else math.nan


def authors_mean_iou(conf: Tensor) -> float:
    """Mean IoU over all classes with 0 / 0 (absent from ground truth and predictions) counted as 1."""
    iou = iou_per_class(conf)
    return float(torch.where(torch.isnan(iou), torch.ones_like(iou), iou).mean())


def segmentation_scores(conf: Tensor, class_names: tuple[str, ...]) -> dict:
    """``{"iou": {class: IoU or None}, "miou": float, "miou_authors": float, "accuracy": float, "points": int}``
    (IoUs in [0, 1])."""
    if conf.shape != (len(class_names), len(class_names)):
        raise DataError(f"confusion matrix {tuple(conf.shape)} does not match {len(class_names)} class names")
    iou = iou_per_class(conf)
    total = int(conf.sum())
    return {
        "iou": {name: (None if math.isnan(v) else float(v)) for name, v in zip(class_names, iou.tolist())},
        "miou": mean_iou(conf),
        "miou_authors": authors_mean_iou(conf),
        "accuracy": float(conf.diagonal().sum()) / total if total else math.nan,
        "points": total,
    }

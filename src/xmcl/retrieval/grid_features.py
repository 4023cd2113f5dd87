"""Grid features: a frozen image backbone's last feature map, stored as precomputed "regions".

Each image (resized to ``image_size`` x ``image_size`` without keeping the aspect ratio) becomes the
(h * w, C) matrix of its last feature map, cells in row-major order (row r, column c -> region r * w + c),
written as float16 in the precomputed layout (``xmcl.data.precomputed``) so the region-feature training path
reads it like bottom-up-attention features. Extraction is resumable: rows are flushed block by block, and a
rerun continues after the last flushed block, provided the backbone (name and weights fingerprint), the image
size and the split are the same; otherwise ``PrecomputedWriter`` raises ``CheckpointError``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from xmcl.data.corpus import CaptionSplit
from xmcl.data.images import load_image
from xmcl.data.open import open_split
from xmcl.data.precomputed import PrecomputedWriter
from xmcl.errors import DataError
from xmcl.nn.backbones import ImageBackbone, build_image_backbone
from xmcl.runtime.device import resolve_device


class _ImageFiles(Dataset):
    """Decodes image files to uint8 tensors (size, size, 3); run in DataLoader workers."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(load_image(self.paths[index], self.size)))


def grid_shape(backbone: ImageBackbone, image_size: int, device: torch.device) -> tuple[int, int]:
    """(regions h * w, channels C) of the backbone's feature map at ``image_size``, from one blank image."""
    with torch.no_grad():
        fmap = backbone(torch.zeros(1, 3, image_size, image_size, device=device))
    return fmap.shape[2] * fmap.shape[3], fmap.shape[1]


def extract_grid_features(split: CaptionSplit, backbone: ImageBackbone, out_dir: Path, split_name: str,
                          image_size: int = 224, batch_size: int = 32, device: str | torch.device = "cpu",
                          num_workers: int = 0, progress: bool = True) -> Path:
    """Write ``out_dir/{split_name}_ims.npy`` (N, h * w, C) float16 plus the split's captions; return that path.

    The backbone is moved to ``device`` and put in eval mode; it runs without gradients. Resumes an
    interrupted extraction of the same split with the same backbone and image size.
    """
    if split.image_paths is None:
        raise DataError(f"{split.source} (split '{split.name}'): grid features need raw images, but this split "
                        f"holds precomputed region features")
    device = torch.device(device)
    backbone.to(device).eval()
    regions, dim = grid_shape(backbone, image_size, device)
    meta = {"backbone": backbone.name, "weights_sha256": backbone.fingerprint(), "image_size": image_size}
    writer = PrecomputedWriter(Path(out_dir), split_name, split.image_ids, split.captions, split.caption_image,
                               regions=regions, dim=dim, dtype=np.float16, meta=meta)
    with writer:
        row = writer.done
        loader = DataLoader(_ImageFiles(split.image_paths[row:], image_size), batch_size=batch_size,
                            num_workers=num_workers, pin_memory=device.type == "cuda")
        with tqdm(total=split.num_images, initial=row, unit="img", desc=f"grid features {split_name}",
                  disable=not progress) as bar:
            for images in loader:
                with torch.no_grad():
                    fmap = backbone(backbone.preprocess(images.to(device, non_blocking=True)))
                features = fmap.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h * w, C)
                writer.write(row, features.float().cpu().numpy())
                row += len(images)
                bar.update(len(images))
    return writer.files["ims"]


def extract_corpus_features(data_path: Path, splits: tuple[str, ...], backbone_name: str, weights: str | None,
                            out_dir: Path, image_size: int = 224, batch_size: int = 32, device: str = "auto",
                            num_workers: int = 0) -> list[Path]:
    """``extract_grid_features`` for each split of a raw-image corpus, one backbone for all (``weights`` 'none' =
    random init). Returns the written ``{split}_ims.npy`` paths."""

    backbone = build_image_backbone(backbone_name, None if weights in (None, "none") else weights)
    torch_device = resolve_device(device)
    return [extract_grid_features(open_split(data_path, split), backbone, Path(out_dir), split, image_size,
                                  batch_size, torch_device, num_workers) for split in splits]

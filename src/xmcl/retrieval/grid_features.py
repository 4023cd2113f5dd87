"""Grid features: a frozen image backbone's last feature map, stored as precomputed "regions".

Each image (resized to ``image_size`` x ``image_size`` without keeping the aspect ratio) becomes the
(h * w, C) matrix of its last feature map, cells in row-major order (row r, column c -> region r * w + c),
written as float16 in the precomputed layout (``xmcl.data.precomputed``) so the region-feature training path
reads it like bottom-up-attention features. Extraction is resumable: rows are flushed block by block, and a
rerun continues after the last flushed block, provided the backbone (name and weights fingerprint), the image
size and the split are the same; otherwise ``PrecomputedWriter`` raises ``CheckpointError``.

The folder's ``features.json`` (``FeaturesManifest``) says what made its features: backbone, weights (as given and
their SHA-256), image size, resize rule and normalisation. Training records it in the checkpoint, so that a model
knows how to turn a raw image into its input; ``check_features_match`` refuses a mismatch, naming both sides.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from xmcl.data.corpus import CaptionSplit
from xmcl.data.images import load_image
from xmcl.data.open import open_split
from xmcl.data.precomputed import PrecomputedWriter, discard_incomplete
from xmcl.errors import CheckpointError, ConfigError, DataError
from xmcl.nn.backbones import ImageBackbone, build_image_backbone
from xmcl.runtime.device import resolve_device
from xmcl.runtime.files import atomic_write_json, atomic_write_text
from xmcl.runtime.lock import RunLock

FEATURES_MANIFEST = "features.json"
MANIFEST_FORMAT = "xmcl-features/1"
RESIZE_RULE = "bicubic to image_size x image_size, aspect ratio not kept"
# The fields that make two feature sets interchangeable (``weights`` as given may differ: a moved file, "imagenet").
IDENTITY_FIELDS = ("backbone", "weights_sha256", "image_size", "resize", "mean", "std")


@dataclass(frozen=True)
class FeaturesManifest:
    """What made a folder's grid features: ``backbone`` name, ``weights`` as given ("imagenet", a path or "none")
    and the SHA-256 of the network's state (``ImageBackbone.fingerprint``), the ``image_size``, the ``resize`` rule
    and the normalisation ``mean`` / ``std`` (0-255 scale)."""

    backbone: str
    weights: str
    weights_sha256: str
    image_size: int
    resize: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, backbone: ImageBackbone, weights: str | None, image_size: int) -> "FeaturesManifest":
        """The manifest of features made by ``backbone`` (built from ``weights``) at ``image_size``."""
        given = "none" if weights in (None, "none") else "imagenet" if weights == "imagenet" else \
            str(Path(weights).resolve())
        return cls(backbone.name, given, backbone.fingerprint(),
                   int(image_size), RESIZE_RULE, tuple(backbone.normalization.mean),
                   tuple(backbone.normalization.std))

    def to_dict(self) -> dict:
        return {"format": MANIFEST_FORMAT, **asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "FeaturesManifest":
        """The manifest held by ``data`` (a ``features.json`` or a checkpoint's record); ``CheckpointError``
        naming ``where`` when it is not one."""
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise CheckpointError(f"{where}: not an xmcl features manifest (format {MANIFEST_FORMAT!r} expected)")
        try:
            return cls(str(data["backbone"]), str(data["weights"]), str(data["weights_sha256"]),
                       int(data["image_size"]), str(data["resize"]), tuple(float(v) for v in data["mean"]),
                       tuple(float(v) for v in data["std"]))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{where}: malformed features manifest ({error!r})") from None

    def differences(self, other: "FeaturesManifest") -> list[str]:
        """``"field: mine vs other"`` for each identity field that differs."""
        return [f"{name}: {_short(getattr(self, name))} vs {_short(getattr(other, name))}"
                for name in IDENTITY_FIELDS if getattr(self, name) != getattr(other, name)]


def _short(value) -> str:
    text = str(value)
    return f"{text[:12]}..." if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def read_features_manifest(folder: Path | str) -> FeaturesManifest | None:
    """The ``features.json`` of a features folder, None when it has none (features made before manifests)."""
    path = Path(folder) / FEATURES_MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} cannot be read: {error}") from None
    return FeaturesManifest.from_dict(data, str(path))


def check_features_match(recorded: FeaturesManifest, found: FeaturesManifest, recorded_from: str, found_from: str,
                         allow: bool = False, flag: str = "--allow-feature-mismatch") -> list[str]:
    """Refuse (``CheckpointError``) features ``found`` (from ``found_from``) made otherwise than the ``recorded`` ones
    (from ``recorded_from``), naming every differing field on both sides; with ``allow`` return the differences."""
    differences = recorded.differences(found)
    if differences and not allow:
        raise CheckpointError(f"{found_from} was made otherwise than {recorded_from} ({'; '.join(differences)}; "
                              f"{recorded_from} first); pass {flag} to go on anyway")
    return differences


def write_features_manifest(folder: Path, manifest: FeaturesManifest) -> Path:
    """Write ``folder/features.json``; a folder whose features were made otherwise is refused."""
    existing = read_features_manifest(folder)
    if existing is not None:
        check_features_match(existing, manifest, str(Path(folder) / FEATURES_MANIFEST), "this extraction",
                             flag="another --out folder")
    path = Path(folder) / FEATURES_MANIFEST
    atomic_write_json(path, manifest.to_dict())
    return path


class StoredGrid(torch.nn.Module):
    """uint8 pixels ``(B, S, S, 3)`` -> the grid features of ``backbone`` as the feature files store them:
    ``(B, h * w, C)`` float32 holding float16 values (normalised, the last feature map's cells, rounded)."""

    def __init__(self, backbone: ImageBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone(self.backbone.preprocess(pixels))
        return fmap.flatten(2).transpose(1, 2).half().float()


class _ImageFiles(Dataset):
    """Decodes image files to uint8 tensors (size, size, 3) with "" (or, for a file that cannot be decoded, a
    blank image with the reason); run in DataLoader workers."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        try:
            return torch.from_numpy(np.array(load_image(self.paths[index], self.size))), ""
        except DataError as error:
            return torch.zeros(self.size, self.size, 3, dtype=torch.uint8), str(error)


def _check_sizes(batch_size: int, image_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"features: batch size (--batch-size) = {batch_size} is out of range: must be >= 1")
    if image_size < 16:
        raise ConfigError(f"features: image size (--image-size) = {image_size} is out of range: must be >= 16")


def unreadable_list(out_dir: Path, split_name: str) -> Path:
    """Where the images of a split that cannot be decoded are listed (one ``path: reason`` per line)."""
    return Path(out_dir) / f"{split_name}_unreadable.txt"


def find_unreadable(paths: list[Path], num_workers: int = 0, progress: bool = True) -> list[tuple[int, str]]:
    """``(index, reason)`` of every file of ``paths`` that cannot be decoded as an image (one pass over all)."""
    found = []
    loader = DataLoader(_ImageFiles(paths, 16), batch_size=64, num_workers=num_workers,
                        generator=torch.Generator())
    with tqdm(total=len(paths), unit="img", desc="checking images", disable=not progress) as bar:
        for start, (_, reasons) in zip(range(0, len(paths), 64), loader):
            found += [(start + i, reason) for i, reason in enumerate(reasons) if reason]
            bar.update(len(reasons))
    return found


def _refuse_unreadable(failed: list[tuple[int, str]], split: CaptionSplit, listed: Path, kept: int) -> DataError:
    shown = "; ".join(reason for _, reason in failed[:5]) + (f"; and {len(failed) - 5} more" if len(failed) > 5
                                                            else "")
    return DataError(f"{len(failed)} of {split.num_images} images of {split.source} (split '{split.name}') cannot "
                     f"be read, all listed in {listed}: {shown}. Fix or replace them and run again (the {kept} "
                     f"images before the first are kept), or pass --skip-unreadable to leave them out")


def grid_shape(backbone: ImageBackbone, image_size: int, device: torch.device) -> tuple[int, int]:
    """(regions h * w, channels C) of the backbone's feature map at ``image_size``, from one blank image."""
    with torch.no_grad():
        fmap = backbone(torch.zeros(1, 3, image_size, image_size, device=device))
    return fmap.shape[2] * fmap.shape[3], fmap.shape[1]


def extract_grid_features(split: CaptionSplit, backbone: ImageBackbone, out_dir: Path, split_name: str,
                          image_size: int = 224, batch_size: int = 32, device: str | torch.device = "cpu",
                          num_workers: int = 0, progress: bool = True, skip_unreadable: bool = False) -> Path:
    """Write ``out_dir/{split_name}_ims.npy`` (N, h * w, C) float16 plus the split's captions; return that path.

    The backbone is moved to ``device`` and put in eval mode; it runs without gradients. Resumes an
    interrupted extraction of the same split with the same backbone and image size. Images that cannot be decoded
    are all found in one pass and listed in ``unreadable_list(out_dir, split_name)``: by default the extraction
    stops writing at the first (the rows before it are kept, so a rerun after fixing them continues there),
    checks every remaining file, and raises ``DataError`` naming them; with ``skip_unreadable`` they are found
    first and left out of the split, with their captions.
    """
    if split.image_paths is None:
        raise DataError(f"{split.source} (split '{split.name}'): grid features need raw images, but this split "
                        f"holds precomputed region features")
    _check_sizes(batch_size, image_size)
    listed = unreadable_list(out_dir, split_name)
    if skip_unreadable:
        skipped = find_unreadable(split.image_paths, num_workers, progress)
        if skipped:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            atomic_write_text(listed, "".join(f"{reason}\n" for _, reason in skipped))
            tqdm.write(f"skipping {len(skipped)} of {split.num_images} images of split '{split_name}' that cannot be "
                       f"read (listed in {listed})", file=sys.stderr)
            bad = {index for index, _ in skipped}
            discard_incomplete(out_dir, split_name, split.image_ids)  # a run that stopped at them, without the flag
            split = split.subset([n for n in range(split.num_images) if n not in bad])
    device = torch.device(device)
    backbone.to(device).eval()
    regions, dim = grid_shape(backbone, image_size, device)
    meta = {"backbone": backbone.name, "weights_sha256": backbone.fingerprint(), "image_size": image_size}
    writer = PrecomputedWriter(Path(out_dir), split_name, split.image_ids, split.captions, split.caption_image,
                               regions=regions, dim=dim, dtype=np.float16, meta=meta)
    stored = StoredGrid(backbone)
    failed: list[tuple[int, str]] = []
    with writer:
        row = position = writer.done
        loader = DataLoader(_ImageFiles(split.image_paths[row:], image_size), batch_size=batch_size,
                            num_workers=num_workers, pin_memory=device.type == "cuda", generator=torch.Generator())
        with tqdm(total=split.num_images, initial=row, unit="img", desc=f"grid features {split_name}",
                  disable=not progress) as bar:
            for images, reasons in loader:
                bad = [i for i, reason in enumerate(reasons) if reason]
                usable = len(images) if not (failed or bad) else 0 if failed else bad[0]
                failed += [(position + i, reasons[i]) for i in bad]
                if usable:  # rows are written in order: none after the first unreadable image
                    with torch.no_grad():
                        features = stored(images[:usable].to(device, non_blocking=True))
                    writer.write(row, features.cpu().numpy())
                    row += usable
                position += len(images)
                bar.update(len(images))
    if failed:
        atomic_write_text(listed, "".join(f"{reason}\n" for _, reason in failed))
        raise _refuse_unreadable(failed, split, listed, row)
    if not skip_unreadable:
        listed.unlink(missing_ok=True)  # an earlier run's list, now fixed
    return writer.files["ims"]


def extract_corpus_features(data_path: Path, splits: tuple[str, ...], backbone_name: str, weights: str | None,
                            out_dir: Path, image_size: int = 224, batch_size: int = 32, device: str = "auto",
                            num_workers: int = 0, skip_unreadable: bool = False) -> list[Path]:
    """``extract_grid_features`` for each split of a raw-image corpus, one backbone for all (``weights`` 'none' =
    random init), with ``out_dir`` locked against a second writer. Writes the folder's ``features.json`` first.
    Returns the written ``{split}_ims.npy`` paths."""
    _check_sizes(batch_size, image_size)
    with RunLock(out_dir, "features folder"):
        backbone = build_image_backbone(backbone_name, None if weights in (None, "none") else weights)
        torch_device = resolve_device(device)
        write_features_manifest(Path(out_dir), FeaturesManifest.of(backbone, weights, image_size))
        return [extract_grid_features(open_split(data_path, split), backbone, Path(out_dir), split, image_size,
                                      batch_size, torch_device, num_workers, skip_unreadable=skip_unreadable)
                for split in splits]

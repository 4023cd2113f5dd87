"""The demo: shapes world -> cached grid features and a small CLIP teacher -> the variant that wins the shapes
comparison (USER with CGE and semantically tolerant queues) and the VSE++ baseline -> their test recall side by side.

Every stage resumes: an existing corpus, completed feature splits, a finished CLIP teacher and its cache and
finished training runs are reused, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from xmcl.config import SHIPPED_CONFIGS, load_config
from xmcl.data.shapes import JSON_NAME, generate_shapes_world
from xmcl.metrics.retrieval import format_table
from xmcl.nn.backbones import build_image_backbone
from xmcl.retrieval.config import RetrievalTrainConfig
from xmcl.retrieval.grid_features import extract_corpus_features
from xmcl.retrieval.inference import evaluate_checkpoint
from xmcl.training.retrieval_trainer import train_retrieval

# label -> (run folder in the demo folder, shipped config): the shapes comparison's winner, then its baseline
DEMO_RUNS = {"USER + CGE + tolerant queues": ("user_cge_tolerant", "shapes_user_cge_tolerant.yaml"),
             "VSE++": ("vsepp", "shapes_vsepp.yaml")}
FEATURE_IMAGE_SIZE = 128  # EfficientNet-Lite0 at 128 px gives a 4 x 4 grid of 1280-d cells
SPLITS = ("train", "val", "test")


def run_folder(out: Path, name: str) -> Path:
    """The training folder of the demo run ``name`` (a key of ``DEMO_RUNS``) in the demo folder ``out``."""
    return Path(out) / DEMO_RUNS[name][0]


def _clip_teacher(corpus: Path, out: Path, seed: int, epochs: int | None) -> list[str]:
    """Train the small CLIP teacher on ``corpus`` into ``out/clip`` and cache its embeddings in ``out/clip_cache``
    (both resume); the overrides that point a CGE run at them."""
    from xmcl.retrieval.clip.cache import build_clip_cache
    from xmcl.retrieval.clip.config import ClipTrainConfig
    from xmcl.training.clip_trainer import train_clip

    overrides = [f"data.path={corpus}", f"run.seed={seed}"] + ([f"optim.epochs={epochs}"] if epochs else [])
    print(f"== training the CLIP teacher into {out / 'clip'}")
    train_clip(load_config(ClipTrainConfig, None, overrides), out / "clip")
    build_clip_cache(out / "clip", corpus, out / "clip_cache", SPLITS)
    return [f"model.clip_path={out / 'clip'}", f"model.clip_cache={out / 'clip_cache'}"]


def _backbone_weights() -> str | None:
    """The packaged ImageNet weights when installed (``make install`` installs them), else random init (with a
    notice)."""
    from xmcl.errors import ConfigError

    try:
        build_image_backbone("efficientnet_lite0", "imagenet")
        return "imagenet"
    except ConfigError as error:
        print(f"note: {error}; the demo falls back to a random-init backbone")
        return None


def run_demo(out: Path, num_images: int = 1500, epochs: int | None = None, config_dir: Path = SHIPPED_CONFIGS,
             seed: int = 0) -> str:
    """Run the whole demo in ``out`` and return the printed recall table (shapes-world test split); ``epochs``
    (default: the configs') is every run's budget, the CLIP teacher's included."""
    out = Path(out)
    corpus = out / "shapes"
    if not (corpus / JSON_NAME).exists():
        generate_shapes_world(corpus, num_images=num_images, seed=seed)
    features = out / "features"
    extract_corpus_features(corpus, SPLITS, "efficientnet_lite0", _backbone_weights(), features,
                            image_size=FEATURE_IMAGE_SIZE)
    teacher: list[str] = []
    results = {}
    for name, (_, config_file) in DEMO_RUNS.items():
        overrides = [f"data.path={features}", f"run.seed={seed}"]
        if epochs is not None:
            overrides.append(f"optim.epochs={epochs}")
        cfg = load_config(RetrievalTrainConfig, config_dir / config_file, overrides)
        if cfg.model.cge:
            teacher = teacher or _clip_teacher(corpus, out, seed, epochs)
            cfg = load_config(RetrievalTrainConfig, config_dir / config_file, overrides + teacher)
        run_dir = run_folder(out, name)
        print(f"== training {name} ({config_file}) into {run_dir}")
        train_retrieval(cfg, run_dir)
        results[f"{name} (test)"] = evaluate_checkpoint(run_dir / "best.pt", features, "test", ("all",))["all"]
    return "shapes world, test split (R@K in %):\n" + format_table(results)

"""xmcl: cross-modal contrastive learning (USER image-text retrieval, ST-SLidR image-to-point distillation)."""

__version__ = "0.1.0"

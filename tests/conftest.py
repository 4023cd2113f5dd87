"""Test-wide settings: one torch thread (tiny models run many small kernels, which extra threads only slow down)
and Hugging Face kept offline."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def single_thread():
    """Every test starts on one thread, whatever an earlier one set (the trainer applies its config's threads)."""
    torch.set_num_threads(1)
    yield

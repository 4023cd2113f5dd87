"""Test-wide settings: one torch thread (tiny models run many small kernels, which extra threads only slow down)
and Hugging Face kept offline."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)

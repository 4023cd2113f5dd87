"""Mixed precision of a training loop (``run.amp``) and the CUDA settings that go with the GPU path.

``run.amp``: "none" (float32), "bf16" (autocast to bfloat16: on CUDA where ``torch.cuda.is_bf16_supported()``, and
on CPU), "fp16" (autocast to float16 with a ``torch.amp.GradScaler``; CUDA only: refused elsewhere). A loop runs
its forward pass and loss under ``precision.autocast()``, then ``precision.backward(loss)``, averages the (scaled)
gradients over the ranks, ``precision.unscale(optimizer)`` before clipping, and ``precision.step(optimizer)``
(which skips a step whose gradients overflowed, and adapts the scale). The scaler's state travels in checkpoints
(``state_dict`` / ``load_state_dict``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from xmcl.errors import ConfigError

AMP_MODES = ("none", "bf16", "fp16")


class Precision:
    """The ``run.amp`` mode of a run on ``device`` (see the module docstring); ``ConfigError`` naming ``run.amp``
    for a mode the device cannot run."""

    def __init__(self, amp: str, device: torch.device) -> None:
        if amp not in AMP_MODES:
            raise ConfigError(f"run.amp: {amp!r} is not one of {', '.join(AMP_MODES)}")
        if amp == "fp16" and device.type != "cuda":
            raise ConfigError(f"run.amp: fp16 needs CUDA (float16 autocast with a GradScaler); this run is on "
                              f"{device}: use run.amp=bf16 (bfloat16 autocast works on CPU) or run.amp=none")
        if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"run.amp: bf16 is not supported on {torch.cuda.get_device_name(device)} "
                              f"(torch.cuda.is_bf16_supported() is False): use run.amp=fp16 or run.amp=none")
        if amp == "bf16" and device.type not in ("cuda", "cpu"):
            raise ConfigError(f"run.amp: bf16 autocast runs on CUDA or CPU, not on {device}: use run.amp=none")
        self.amp, self.device = amp, device
        self.dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None

    def autocast(self) -> AbstractContextManager:
        """The autocast region of the forward pass and the loss (a no-op for "none")."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` (scaled first under fp16)."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale (fp16), before clipping or reading their norm."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimiser step (fp16: skipped when a gradient is not finite, then the scale is updated)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (empty without one)."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore a scaler's state; an empty or missing one (a run saved without fp16) leaves it fresh."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def cuda_layout(module: nn.Module, device: torch.device) -> nn.Module:
    """On CUDA, the module's 4-D weights (convolution kernels) in ``channels_last``, the layout cuDNN runs fastest
    (tensor cores, with mixed precision); unchanged elsewhere and for modules without 4-D weights."""
    return module.to(memory_format=torch.channels_last) if device.type == "cuda" else module

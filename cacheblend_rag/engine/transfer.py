"""Host-built tensors to the model's device without waiting for the copy."""

from __future__ import annotations

import torch


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a CPU tensor the caller no longer changes) on ``device``. On CUDA the copy goes through pinned memory
    with ``non_blocking=True``, so the host does not wait for it (a pageable copy synchronises the stream)."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)

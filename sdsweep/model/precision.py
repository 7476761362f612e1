"""Precision names to torch dtypes, and the one autocast context training, caching and sampling share."""

from __future__ import annotations

import contextlib

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_dtype_of(precision) -> torch.dtype | None:
    """The autocast dtype of `precision.mixed_precision` (None: `no`, full precision)."""
    mp = precision.mixed_precision
    return None if mp == "no" else DTYPES[mp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast in `dtype` on `device`'s type; a no-op region when `dtype` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

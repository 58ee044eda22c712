"""uint8 pixels ↔ the [-1, 1] floats every model here reads (NumPy or JAX arrays; NumPy only, so PyTorch-only tools
can import it)."""

from __future__ import annotations

import numpy as np

_SCALE = np.float32(2.0 / 255.0)  # = 1/127.5 exactly: x/127.5 − 1 as ADM, as a multiply


def to_signed(images_uint8):
    """uint8 [0, 255] → float32 in [-1, 1]."""
    return images_uint8.astype(np.float32) * _SCALE - np.float32(1.0)


def to_uint8(images) -> np.ndarray:
    """Float images in [-1, 1] → uint8 [0, 255] (clipped, rounded)."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)

"""PNG image grids."""

from __future__ import annotations

import numpy as np
from PIL import Image

from latent_lm import storage


def make_grid(images_uint8: np.ndarray, ncols: int = 10, pad: int = 2) -> np.ndarray:
    """Tiles images [N,H,W,C] row-major into [rows·(H+pad)+pad, ncols·(W+pad)+pad, C], background 0."""
    images = np.asarray(images_uint8)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N,H,W,C], got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = im
    return grid


def save_image_grid(images_uint8: np.ndarray, path: str, ncols: int = 10, pad: int = 2) -> None:
    """Writes the grid of `make_grid` as a PNG (grayscale for C=1), atomically (temp file + rename; `path` may be
    a URL)."""
    grid = make_grid(images_uint8, ncols, pad)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    with storage.atomic_open(path, "wb") as f:
        image.save(f, format="PNG")


def save_captioned_grid(images_uint8: np.ndarray, captions: list[str], path: str, ncols: int = 5) -> None:
    """Images with a caption under each (text-to-image prompts, image-to-text outputs) as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    images = np.asarray(images_uint8)
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.0 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, im, text in zip(axes.flat, images, captions):
        ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray", vmin=0, vmax=255)
        ax.set_title("".join(ch if ch.isprintable() else "?" for ch in text), fontsize=6, wrap=True)
    fig.tight_layout()
    with storage.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)

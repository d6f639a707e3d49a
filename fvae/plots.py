"""Figures a run leaves in workdir/figures/ (matplotlib, no display needed)."""

from __future__ import annotations

import os
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def tile(images: np.ndarray, ncols: int) -> np.ndarray:
    """[N, 28, 28(, 1)] images in [0, 1] -> one [rows*28, ncols*28] mosaic."""
    images = np.asarray(images, np.float32).reshape(len(images), 28, 28)
    nrows = -(-len(images) // ncols)
    canvas = np.ones((nrows * 28, ncols * 28), np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, ncols)
        canvas[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28] = image
    return canvas


def _save(fig, path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def reconstruction_grid(originals: np.ndarray, reconstructions: np.ndarray,
                        path: str | os.PathLike, title: str = "") -> pathlib.Path:
    """Test images (top row) above their reconstructions (bottom row)."""
    n = len(originals)
    fig, axes = plt.subplots(2, 1, figsize=(max(4, n * 0.6), 2.8))
    for ax, images, label in zip(axes, (originals, reconstructions),
                                 ("test images", "reconstructions")):
        ax.imshow(tile(images, n), cmap="gray", vmin=0, vmax=1)
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title or "Reconstructions (pixel means)")
    return _save(fig, path)


def sample_grid(samples: np.ndarray, path: str | os.PathLike, title: str = "",
                ncols: int = 8) -> pathlib.Path:
    """Pixel means of images decoded from prior samples."""
    fig, ax = plt.subplots(figsize=(ncols * 0.6, max(1, -(-len(samples) // ncols)) * 0.6 + 0.5))
    ax.imshow(tile(samples, ncols), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title or "Samples from the prior (pixel means)")
    return _save(fig, path)

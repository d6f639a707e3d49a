"""Image mosaics: a batch of small images as one 2-D array (figures, TensorBoard)."""

from __future__ import annotations

import numpy as np


def tile(images: np.ndarray, ncols: int) -> np.ndarray:
    """[N, 28, 28(, 1)] images in [0, 1] -> one [rows*28, ncols*28] mosaic."""
    images = np.asarray(images, np.float32).reshape(len(images), 28, 28)
    nrows = -(-len(images) // ncols)
    canvas = np.ones((nrows * 28, ncols * 28), np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, ncols)
        canvas[r * 28:(r + 1) * 28, c * 28:(c + 1) * 28] = image
    return canvas

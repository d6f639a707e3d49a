"""Stochastic binarisation of Fashion-MNIST: pixel p/255 becomes 255 with probability p/255.

Training with `data.binarize='dynamic'` draws fresh binary images every step
(`binarize` with the step's key); evaluation binarises the test set once with a fixed
key (`binarize_fixed`; the validation split with another) so every run is scored on
the same binary images, which is
the protocol of published binarised (Fashion-)MNIST likelihood tables.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

TEST_SEED = 20160405  # the fixed key of the evaluation binarisation; never change it
VALIDATION_SEED = TEST_SEED + 2  # the validation split's (+1 is the latent probe's)


def binarize(key: jax.Array, images: jax.Array) -> jax.Array:
    """uint8 images -> uint8 images of 0/255, each pixel ~ Bernoulli(pixel / 255). Jittable."""
    if images.dtype != jnp.uint8:
        raise TypeError(f"binarize expects uint8 images in 0..255, got {images.dtype}; "
                        "binarise the raw dataset arrays, before to_float.")
    on = jax.random.bernoulli(key, images.astype(jnp.float32) / 255.0)
    return jnp.where(on, 255, 0).astype(jnp.uint8)


def binarize_fixed(images: np.ndarray, seed: int = TEST_SEED) -> np.ndarray:
    """The fixed binarisation of a dataset split: image i uses key fold_in(key(seed), i),
    so a prefix of a split is binarised exactly as in the whole split."""
    key = jax.random.key(seed)
    one = lambda i, image: binarize(jax.random.fold_in(key, i), image)  # noqa: E731
    out = jax.jit(jax.vmap(one))(jnp.arange(len(images)), jnp.asarray(images))
    return np.asarray(out)

"""The study's VAEs as Flax linen modules.

`ConvVAE` is the study's high-capacity model; `KerasVAE` is the classic small model
of the Keras example. Both decoders return logits (pre-sigmoid); what a logit means
as an image is the likelihood's business (`fvae.losses.pixel_mean`).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

IMAGE_SHAPE = (28, 28, 1)


class ResBlock(nn.Module):
    """Two 3x3 convs with a skip connection."""
    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(self.width, (3, 3))(x))
        h = nn.Conv(self.width, (3, 3))(h)
        return nn.relu(x + h)


class ConvEncoder(nn.Module):
    """Strided convs, a dense layer, then mean and log-variance heads."""
    latent_dim: int
    widths: Sequence[int] = (32, 64, 128)
    strides: Sequence[int] = (2, 2, 1)
    dense: int = 256

    @nn.compact
    def __call__(self, x):
        for width, stride in zip(self.widths, self.strides):
            x = nn.relu(nn.Conv(width, (3, 3), strides=(stride, stride))(x))
        x = nn.relu(nn.Dense(self.dense)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.latent_dim, name="mean")(x), \
            nn.Dense(self.latent_dim, name="logvar")(x)


class ConvDecoder(nn.Module):
    """Dense to 7x7, two stride-2 transposed convs, residual blocks, 1-channel logits."""
    widths: Sequence[int] = (128, 64, 32)
    num_res_blocks: int = 2

    @nn.compact
    def __call__(self, z):
        x = nn.relu(nn.Dense(7 * 7 * self.widths[0])(z))
        x = x.reshape(z.shape[0], 7, 7, self.widths[0])
        for width in self.widths[1:]:
            x = nn.relu(nn.ConvTranspose(width, (3, 3), strides=(2, 2), padding="SAME")(x))
        for _ in range(self.num_res_blocks):
            x = ResBlock(self.widths[-1])(x)
        return nn.Conv(1, (3, 3))(x)


class KerasEncoder(nn.Module):
    """The Keras example's encoder: two strided convs and Dense(16)."""
    latent_dim: int = 2

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(x))
        x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.latent_dim, name="mean")(x), \
            nn.Dense(self.latent_dim, name="logvar")(x)


class KerasDecoder(nn.Module):
    """The Keras example's decoder: Dense(7*7*64) and three transposed convs."""

    @nn.compact
    def __call__(self, z):
        x = nn.relu(nn.Dense(7 * 7 * 64)(z)).reshape(z.shape[0], 7, 7, 64)
        x = nn.relu(nn.ConvTranspose(64, (3, 3), strides=(2, 2), padding="SAME")(x))
        x = nn.relu(nn.ConvTranspose(32, (3, 3), strides=(2, 2), padding="SAME")(x))
        return nn.ConvTranspose(1, (3, 3), padding="SAME")(x)


class VAE(nn.Module):
    """An encoder q(z|x) = N(mean, exp(logvar)) and a decoder p(x|z) given as logits."""
    encoder: nn.Module
    decoder: nn.Module

    def __call__(self, images, key):
        """Returns (logits, mean, logvar) for float images in [0, 1], [B, 28, 28, 1]."""
        mean, logvar = self.encode(images)
        z = reparameterize(key, mean, logvar)
        return self.decode(z), mean, logvar

    def encode(self, images):
        return self.encoder(images)

    def decode(self, z):
        return self.decoder(z)


def reparameterize(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """z = mean + sigma * eps with eps ~ N(0, I) drawn from `key`."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def build_model(model_config: ml_collections.ConfigDict) -> VAE:
    """Builds the VAE the config's `model` block names."""
    if model_config.name == "keras":
        return VAE(KerasEncoder(model_config.latent_dim), KerasDecoder())
    return VAE(
        ConvEncoder(model_config.latent_dim, tuple(model_config.encoder_widths),
                    tuple(model_config.encoder_strides), model_config.encoder_dense),
        ConvDecoder(tuple(model_config.decoder_widths), model_config.num_res_blocks))


def init_params(model: VAE, key: jax.Array):
    """Initial parameters for a batch of one 28x28 image."""
    init_key, sample_key = jax.random.split(key)
    return model.init(init_key, jnp.zeros((1, *IMAGE_SHAPE)), sample_key)["params"]


def to_float(images: jax.Array) -> jax.Array:
    """uint8 [B, 28, 28] (or already-float [B, 28, 28, 1]) -> float32 in [0, 1], NHWC."""
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    return images.reshape(images.shape[0], *IMAGE_SHAPE)


def encode(model: VAE, params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior mean and log-variance for a batch of images."""
    return model.apply({"params": params}, to_float(images), method=VAE.encode)


def decode(model: VAE, params, z: jax.Array) -> jax.Array:
    """Decoder logits [B, 28, 28, 1] for latents z."""
    return model.apply({"params": params}, z, method=VAE.decode)


def sample(model: VAE, params, key: jax.Array, num: int, latent_dim: int,
           mean_fn=jax.nn.sigmoid) -> jax.Array:
    """Pixel means of images decoded from `num` draws of the prior N(0, I)."""
    z = jax.random.normal(key, (num, latent_dim))
    return mean_fn(decode(model, params, z))


def reconstruct(model: VAE, params, images: jax.Array, key: jax.Array | None = None,
                mean_fn=jax.nn.sigmoid) -> jax.Array:
    """Pixel means of reconstructions: through a posterior draw, or its mean if no key."""
    mean, logvar = encode(model, params, images)
    z = mean if key is None else reparameterize(key, mean, logvar)
    return mean_fn(decode(model, params, z))

"""Likelihoods, the KL term and the beta schedule, in nats per image.

Units: every quantity here is per image (summed over pixels or latent dimensions)
and then averaged over the batch. `recon` is the reconstruction term the optimizer
sees; `elbo` is the negative ELBO with beta = 1 under the likelihood the config
names, so runs with different beta or MSE reductions can be compared.

MSE as a likelihood: minimising sum_i (x_i - mu_i)^2 is maximum likelihood for a
Gaussian with variance 1/2; the mean over D pixels is a Gaussian with variance D/2
(a far weaker likelihood, which is why mean-reduced MSE drives posterior collapse).
`elbo` uses exactly those variances, so it equals the loss at beta = 1 plus a
constant, and is an honest bound for the model being trained.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

NUM_PIXELS = 28 * 28


def bernoulli_nll(logits: jax.Array, x: jax.Array) -> jax.Array:
    """-log Bernoulli(x | sigmoid(logits)) summed over pixels, per image; stable."""
    per_pixel = jax.nn.softplus(logits) - x * logits
    return per_pixel.reshape(per_pixel.shape[0], -1).sum(-1)


def squared_error(logits: jax.Array, x: jax.Array, reduction: str = "sum") -> jax.Array:
    """(x - sigmoid(logits))^2 summed or averaged over pixels, per image."""
    err = jnp.square(x - jax.nn.sigmoid(logits)).reshape(x.shape[0], -1)
    return err.sum(-1) if reduction == "sum" else err.mean(-1)


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent dimensions, per image."""
    return 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar, axis=-1)


def reconstruction_loss(logits: jax.Array, x: jax.Array,
                        loss_config: ml_collections.ConfigDict) -> jax.Array:
    """The per-image reconstruction term the config's likelihood minimises."""
    if loss_config.likelihood == "bce":
        return bernoulli_nll(logits, x)
    return squared_error(logits, x, loss_config.reduction)


def negative_log_likelihood(logits: jax.Array, x: jax.Array,
                            loss_config: ml_collections.ConfigDict) -> jax.Array:
    """-log p(x|z) in nats per image under the likelihood the config names."""
    if loss_config.likelihood == "bce":
        return bernoulli_nll(logits, x)
    num_pixels = x[0].size
    variance = 0.5 if loss_config.reduction == "sum" else 0.5 * num_pixels
    sq = squared_error(logits, x, "sum")
    return sq / (2 * variance) + 0.5 * num_pixels * jnp.log(2 * jnp.pi * variance)


def pixel_mean(logits: jax.Array, loss_config: ml_collections.ConfigDict) -> jax.Array:
    """The image a decoder output stands for: the likelihood's mean per pixel."""
    del loss_config  # bce and mse both use sigmoid(logits) as the pixel mean
    return jax.nn.sigmoid(logits)


def per_image_terms(logits: jax.Array, mean: jax.Array, logvar: jax.Array, x: jax.Array,
                    beta: jax.Array, loss_config: ml_collections.ConfigDict
                    ) -> dict[str, jax.Array]:
    """loss, recon, kl and elbo (negative ELBO at beta = 1) per image, in nats."""
    recon = reconstruction_loss(logits, x, loss_config)
    kl = gaussian_kl(mean, logvar)
    elbo = negative_log_likelihood(logits, x, loss_config) + kl
    return {"loss": recon + beta * kl, "recon": recon, "kl": kl, "elbo": elbo}


def vae_loss(logits: jax.Array, mean: jax.Array, logvar: jax.Array, x: jax.Array,
             beta: jax.Array, loss_config: ml_collections.ConfigDict
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Batch-mean loss = recon + beta * KL, and its named parts (nats per image)."""
    terms = per_image_terms(logits, mean, logvar, x, beta, loss_config)
    parts = {name: value.mean() for name, value in terms.items()}
    parts["beta"] = jnp.asarray(beta, jnp.float32)
    return parts["loss"], parts


def make_beta_schedule(loss_config: ml_collections.ConfigDict, steps_per_epoch: int,
                       total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """beta as a pure function of the step: constant, linear warm-up, or cyclical.

    Cyclical follows Fu et al. (2019): each cycle ramps linearly from beta_start to
    beta over `cycle_ratio` of its length, then holds beta.
    """
    beta, start = float(loss_config.beta), float(loss_config.beta_start)
    kind = loss_config.beta_schedule
    warmup = loss_config.warmup_steps or int(round(loss_config.warmup_epochs * steps_per_epoch))
    cycle = loss_config.cycle_steps or max(1, total_steps // 4)
    ramp = max(1.0, loss_config.cycle_ratio * cycle)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if kind == "constant" or (kind == "linear" and warmup == 0):
            return jnp.asarray(beta, jnp.float32)
        if kind == "linear":
            frac = jnp.minimum(1.0, step / warmup)
        else:
            frac = jnp.minimum(1.0, jnp.mod(step, cycle) / ramp)
        return start + (beta - start) * frac

    return schedule

"""Likelihoods, the KL term and the beta schedule, in nats per image.

Units: every quantity here is per image (summed over pixels or latent dimensions)
and then averaged over the batch. `recon` is the reconstruction term the optimizer
sees; `elbo` is the negative ELBO with beta = 1 under the likelihood the config
names, so runs with different beta or MSE reductions can be compared.

The decoder output `out` [B, 28, 28, C] holds the likelihood's parameters; channel 0
is a location, channel 1 (when the likelihood needs one, model.decoder_scale) a
log-scale. Each likelihood (loss.likelihood) defines -log p(x|z) and a pixel mean:

  bce                   Bernoulli(sigmoid(out)); mean sigmoid(out).
  mse                   Gaussian with a fixed variance, mean sigmoid(out) (below).
  continuous_bernoulli  the normalised density C(l) s^x (1-s)^(1-x) on [0, 1],
                        s = sigmoid(l) (Loaiza-Ganem & Cunningham 2019); its mean is
                        not s, see continuous_bernoulli_mean.
  gaussian              N(sigmoid(out[..., 0]), sigma^2) with one sigma for all
                        pixels (sigma-VAE, Rybkin et al. 2021): 'learned' reads log
                        sigma from channel 1; 'optimal' uses the maximum-likelihood
                        sigma^2 = the mean squared error of the batch at hand (all its
                        images and pixels), a constant for the gradient. So does the
                        per-epoch validation loss of metrics.jsonl (per evaluation batch);
                        eval.json scores the model with one sigma fitted once on the
                        training split (fvae.evaluate.gaussian_log_sigma), so that its
                        ELBO and IWAE bound are those of one fixed model: a sigma
                        fitted to each image would lower its NLL by tens of nats.
  discretized_logistic  a logistic with location out[..., 0] (pixel units) and
                        log-scale out[..., 1], integrated over the 256 bins of 8-bit
                        values, edge bins to +-inf (PixelCNN++): a probability, so
                        its NLL / (784 ln 2) is bits per dimension.

mse, continuous_bernoulli and gaussian are densities on [0, 1]: their NLL can be
negative and compares only with other densities on the same scale.

MSE as a likelihood: minimising sum_i (x_i - mu_i)^2 is maximum likelihood for a
Gaussian with variance 1/2; the mean over D pixels is a Gaussian with variance D/2
(a far weaker likelihood, which is why mean-reduced MSE drives posterior collapse).
`elbo` uses exactly those variances, so it equals the loss at beta = 1 plus a
constant, and is an honest bound for the model being trained.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from fvae import configs

NUM_PIXELS = 28 * 28
NUM_LEVELS = 256  # 8-bit pixel values, x = k / 255
LOG_2PI = math.log(2 * math.pi)
# Floors on log-scales: Rybkin et al.'s -6 for the Gaussian's sigma; PixelCNN++'s -7
# on [-1, 1] data is -7 - log 2 on [0, 1] pixels. A learned log-scale is soft-floored
# (softclip: gradients flow below it); the batch-optimal sigma is floored exactly.
GAUSSIAN_MIN_LOG_SIGMA = -6.0
LOGISTIC_MIN_LOG_SCALE = -7.0 - math.log(2.0)
# |logit| below which the continuous Bernoulli uses Taylor series (float32 error
# ~1e-7 on both sides of the switch; see tests/test_likelihoods.py).
CB_TAYLOR_RADIUS = 0.5


def pixels_last(a: jax.Array) -> jax.Array:
    """[B, ...] -> [B, pixels]. The per-pixel math runs on this layout: XLA:CPU's fused
    elementwise kernels vectorise along the last axis, and with a trailing channel axis
    of 1 (NHWC with one channel) a softplus ran 27x slower (3.0 vs 0.11 ms, batch 128)."""
    return a.reshape(a.shape[0], -1)


def _per_image(per_pixel: jax.Array) -> jax.Array:
    """Sum over every axis but the first (the batch)."""
    return pixels_last(per_pixel).sum(-1)


def bernoulli_nll(logits: jax.Array, x: jax.Array) -> jax.Array:
    """-log Bernoulli(x | sigmoid(logits)) summed over pixels, per image; stable."""
    return _per_image(jax.nn.softplus(logits) - x * logits)


def squared_error(logits: jax.Array, x: jax.Array, reduction: str = "sum") -> jax.Array:
    """(x - sigmoid(logits))^2 summed or averaged over pixels, per image."""
    err = pixels_last(jnp.square(x - jax.nn.sigmoid(logits)))
    return err.sum(-1) if reduction == "sum" else err.mean(-1)


# ---------------------------------------------------------------- continuous Bernoulli
def continuous_bernoulli_log_norm(logits: jax.Array) -> jax.Array:
    """log C of the continuous Bernoulli, per pixel, in logits l.

    With s = sigmoid(l), 1 - 2s = -tanh(l/2) and artanh(1 - 2s) = -l/2 exactly, so
    C = 2 artanh(1 - 2s) / (1 - 2s) = l / tanh(l/2): finite and smooth for any l.
    Near l = 0 (where it is 0/0) the even Taylor series log 2 + l^2/12 - ... is used.
    """
    small = jnp.abs(logits) < CB_TAYLOR_RADIUS
    safe = jnp.where(small, 1.0, logits)  # keeps the unused branch (and its grad) finite
    exact = jnp.log(safe / jnp.tanh(safe / 2))
    l2 = jnp.square(logits)
    taylor = math.log(2.0) + l2 * (1 / 12 + l2 * (-7 / 1440 + l2 * (
        31 / 90720 + l2 * (-127 / 4838400))))
    return jnp.where(small, taylor, exact)


def continuous_bernoulli_nll(logits: jax.Array, x: jax.Array) -> jax.Array:
    """-log CB(x | sigmoid(logits)) = BCE - log C, summed over pixels, per image."""
    return bernoulli_nll(logits, x) - _per_image(continuous_bernoulli_log_norm(logits))


def continuous_bernoulli_mean(logits: jax.Array) -> jax.Array:
    """E[x] of the continuous Bernoulli, per pixel, in [0, 1].

    s / (2s - 1) + 1 / (2 artanh(1 - 2s)) = 1/2 + (coth(l/2) - 2/l) / 2, i.e.
    (1 + Langevin(l/2)) / 2; Taylor series near l = 0, where it is a difference of
    two large terms.
    """
    small = jnp.abs(logits) < CB_TAYLOR_RADIUS
    safe = jnp.where(small, 1.0, logits)
    exact = 0.5 + 0.5 / jnp.tanh(safe / 2) - 1.0 / safe
    l2 = jnp.square(logits)
    taylor = 0.5 + logits * (1 / 12 + l2 * (-1 / 720 + l2 * (1 / 30240 + l2 * (
        -1 / 1209600))))
    return jnp.where(small, taylor, exact)


# ---------------------------------------------------------------- Gaussian (sigma-VAE)
def softclip(value: jax.Array, minimum: float) -> jax.Array:
    """A smooth lower bound: minimum + softplus(value - minimum) (~value well above it)."""
    return minimum + jax.nn.softplus(value - minimum)


def gaussian_nll(mean: jax.Array, log_sigma: jax.Array, x: jax.Array) -> jax.Array:
    """-log N(x | mean, exp(log_sigma)^2) summed over pixels, per image;
    log_sigma broadcasts against x."""
    z = (x - mean) * jnp.exp(-log_sigma)
    return _per_image(0.5 * jnp.square(z) + log_sigma + 0.5 * LOG_2PI)


def optimal_log_sigma(mean: jax.Array, x: jax.Array) -> jax.Array:
    """log sigma of the Gaussian that fits the whole batch best (sigma^2 = mean squared
    error over images and pixels), floored, as a constant for the gradient."""
    log_sigma = 0.5 * jnp.log(jnp.mean(jnp.square(x - mean)))
    return jax.lax.stop_gradient(jnp.maximum(log_sigma, GAUSSIAN_MIN_LOG_SIGMA))


# ---------------------------------------------------------------- discretized logistic
def _levels_per_scale(log_scale: jax.Array) -> jax.Array:
    """1 / scale in units of one 8-bit level (1/255), the scale soft-floored."""
    return jnp.exp(-softclip(log_scale, LOGISTIC_MIN_LOG_SCALE)) / (NUM_LEVELS - 1)


def discretized_logistic_nll(loc: jax.Array, log_scale: jax.Array,
                             x: jax.Array) -> jax.Array:
    """-log P(k) summed over pixels, per image, for the 8-bit value k = round(255 x).

    P(k) = F(upper) - F(lower) with F the logistic CDF and bins of width 1/255 (the
    first from -inf, the last to +inf). Computed as log sigmoid(a) + log sigmoid(-b) +
    log(1 - exp(b - a)) (a, b: the standardised bin edges), exact and stable for any
    location and scale; an edge bin drops the term of its infinite edge.
    """
    k = jnp.round(jnp.clip(x, 0.0, 1.0) * (NUM_LEVELS - 1))
    inv_scale = _levels_per_scale(log_scale)
    centre = (k - (NUM_LEVELS - 1) * loc) * inv_scale  # in units of the scale
    upper = jax.nn.log_sigmoid(centre + 0.5 * inv_scale)  # log F(upper edge)
    lower = jax.nn.log_sigmoid(-(centre - 0.5 * inv_scale))  # log (1 - F(lower edge))
    width = jnp.log(-jnp.expm1(-inv_scale))
    not_first, not_last = k > 0, k < NUM_LEVELS - 1
    log_p = (jnp.where(not_last, upper, 0.0) + jnp.where(not_first, lower, 0.0)
             + jnp.where(not_first & not_last, width, 0.0))
    return -_per_image(log_p)


def discretized_logistic_mean(loc: jax.Array, log_scale: jax.Array) -> jax.Array:
    """E[k / 255] per pixel = (1/255) sum_{k=1..255} P(K >= k), exactly."""
    edges = jnp.arange(1, NUM_LEVELS) - 0.5  # lower edges of levels 1..255
    tail = jax.nn.sigmoid(((NUM_LEVELS - 1) * loc[..., None] - edges)
                          * _levels_per_scale(log_scale)[..., None])
    return tail.sum(-1) / (NUM_LEVELS - 1)


# ---------------------------------------------------------------- dispatch
def location(out: jax.Array) -> jax.Array:
    """Channel 0 of a decoder output [B, 28, 28, C] (logits or location), [B, 784]."""
    return pixels_last(out[..., 0])


def split_scale(out: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(location, log-scale) channels of a decoder output [B, 28, 28, 2], each [B, 784]."""
    if out.shape[-1] != 2:
        raise ValueError(f"this likelihood needs a decoder output with 2 channels "
                         f"(location, log-scale), got shape {out.shape}: set "
                         "model.decoder_scale to 'shared' or 'per_pixel'")
    return location(out), pixels_last(out[..., 1])


def _mse_nll(out, x, loss_config):
    num_pixels = x[0].size
    variance = 0.5 if loss_config.reduction == "sum" else 0.5 * num_pixels
    sq = squared_error(location(out), x, "sum")
    return sq / (2 * variance) + 0.5 * num_pixels * jnp.log(2 * jnp.pi * variance)


def _gaussian_nll(out, x, loss_config):
    if loss_config.gaussian_variance == "learned":
        loc, log_sigma = split_scale(out)
        log_sigma = softclip(log_sigma, GAUSSIAN_MIN_LOG_SIGMA)
    else:
        loc = location(out)
        log_sigma = optimal_log_sigma(jax.nn.sigmoid(loc), x)
    return gaussian_nll(jax.nn.sigmoid(loc), log_sigma, x)


_NLL = {
    "bce": lambda out, x, c: bernoulli_nll(location(out), x),
    "mse": _mse_nll,
    "continuous_bernoulli": lambda out, x, c: continuous_bernoulli_nll(location(out), x),
    "gaussian": _gaussian_nll,
    "discretized_logistic": lambda out, x, c: discretized_logistic_nll(*split_scale(out), x),
}
_MEAN = {
    "bce": lambda out: jax.nn.sigmoid(location(out)),
    "mse": lambda out: jax.nn.sigmoid(location(out)),
    "continuous_bernoulli": lambda out: continuous_bernoulli_mean(location(out)),
    "gaussian": lambda out: jax.nn.sigmoid(location(out)),
    "discretized_logistic": lambda out: discretized_logistic_mean(*split_scale(out)),
}


def _lookup(table: dict, loss_config: ml_collections.ConfigDict):
    try:
        return table[loss_config.likelihood]
    except KeyError:
        raise ValueError(f"unknown loss.likelihood {loss_config.likelihood!r}; expected "
                         f"one of {', '.join(map(repr, table))}") from None


def reconstruction_loss(out: jax.Array, x: jax.Array,
                        loss_config: ml_collections.ConfigDict) -> jax.Array:
    """The per-image reconstruction term the config's likelihood minimises: the NLL,
    except for mse, which minimises the (summed or averaged) squared error."""
    if loss_config.likelihood == "mse":
        return squared_error(location(out), pixels_last(x), loss_config.reduction)
    return negative_log_likelihood(out, x, loss_config)


def negative_log_likelihood(out: jax.Array, x: jax.Array,
                            loss_config: ml_collections.ConfigDict,
                            log_sigma: jax.Array | None = None) -> jax.Array:
    """-log p(x|z) in nats per image under the likelihood the config names.

    `log_sigma` fixes the sigma that gaussian_variance='optimal' otherwise fits to the
    batch: evaluation scores such a model as one fixed Gaussian (fvae.evaluate)."""
    if log_sigma is not None and loss_config.likelihood == "gaussian" \
            and loss_config.gaussian_variance == "optimal":
        return gaussian_nll(jax.nn.sigmoid(location(out)), log_sigma, pixels_last(x))
    return _lookup(_NLL, loss_config)(out, pixels_last(x), loss_config)


def pixel_mean(out: jax.Array, loss_config: ml_collections.ConfigDict) -> jax.Array:
    """The image a decoder output stands for: the likelihood's mean per pixel,
    [B, 28, 28, 1] in [0, 1]."""
    return _lookup(_MEAN, loss_config)(out).reshape(*out.shape[:-1], 1)


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent dimensions, per image."""
    return 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar, axis=-1)


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
    warmup = configs.beta_warmup_steps(loss_config, steps_per_epoch)
    cycle = configs.beta_cycle_steps(loss_config, total_steps)
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

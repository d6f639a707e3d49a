"""The evaluation of a model on the test split: every number of workdir/eval.json.

`full_evaluation` computes them (fvae.runs.evaluate_run writes them); `epoch_image_metrics`
is the cheap part logged after every training epoch. Likelihood
terms are nats per image (summed over the 784 pixels) under the likelihood the run
was trained with, at beta = 1:

  elbo          negative ELBO: nll_recon + kl (as `elbo` in metrics.jsonl)
  nll_recon     E_q[-log p(x|z)], eval.elbo_samples posterior draws per image
  kl            KL(q(z|x) || N(0, I)), analytic
  kl_per_dim    list [latent_dim]: the mean KL of each latent dimension
  active_units  latent dimensions with Var_x(E_q[z_d]) > 0.01 (Burda et al. 2016)
  iwae_nll      -log p(x) from the IWAE bound, K = eval.iwae_samples (see iwae_bound)
  iwae_bpd      iwae_nll / (784 ln 2), bits per dimension; every likelihood but bce
                (see iwae_bound for what it can be compared with)
  gaussian_log_sigma  gaussian_variance='optimal' only: the one log sigma the
                likelihood terms use, fitted on the training split (gaussian_log_sigma)
  recon_mse     squared error per pixel of reconstructions from the posterior mean
  psnr          mean over images of 10 log10(1 / mse_image), dB for data range 1
  ssim          mean SSIM (Wang et al. 2004), 11x11 Gaussian window, sigma 1.5
  sharpness     gradient energy of the reconstructions / that of the test images
  fd_samples    Fréchet distance, prior samples vs test images (see frechet_distance)
  fd_recons     Fréchet distance, reconstructions vs test images
  classifier_test_accuracy  accuracy of the feature classifier on the test split
  probe_accuracy  test accuracy of a logistic-regression probe on posterior means
  num_test_images, iwae_samples, iwae_num_images, fd_num_samples: what was measured
  iwae_seconds, eval_seconds: wall time of the IWAE pass and of the whole evaluation

Binarised protocol (data.binarize='dynamic'): the model's inputs are the test images
binarised once with a fixed key (fvae.binarize.binarize_fixed), the same for every
run, so iwae_nll is comparable with published binarised Fashion-MNIST tables. The
likelihood terms, latent statistics and the probe use binary inputs; image-quality
metrics and Fréchet distances compare pixel means with the grey-level test images,
whose pixels are exactly the means the binary data are drawn from.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fvae import binarize, classifier, data, losses, models, parallel
from fvae.batching import map_batches

ACTIVE_UNIT_THRESHOLD = 0.01
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
NATS_ONLY_LIKELIHOODS = ("bce",)  # binarised-data tables report nats: no iwae_bpd
PROBE_SEED_OFFSET = 1  # the training split's fixed binarisation uses TEST_SEED + 1


def default_decode_batch() -> int:
    """Decoder inputs per compiled IWAE step: 256 was fastest on CPU (measured), GPUs
    want large batches."""
    return 256 if jax.default_backend() == "cpu" else 4096


# ---------------------------------------------------------------- image quality
def psnr(originals: np.ndarray, recons: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB for data range 1 ([N, H, W] in [0, 1]); capped at 100 dB."""
    mse = np.mean(np.square(np.float64(originals) - recons), axis=(1, 2))
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian; SSIM's 2-D window is its outer product."""
    x = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def _valid_filter(images: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of [N, H, W] as two matrix products."""
    def band(n):  # [n - size + 1, n]: row i holds the window at columns i..i+size-1
        m = np.zeros((n - len(window) + 1, n))
        for i in range(len(m)):
            m[i, i:i + len(window)] = window
        return m
    return band(images.shape[1]) @ images @ band(images.shape[2]).T


def ssim(originals: np.ndarray, recons: np.ndarray) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004): mean of the SSIM map over 'valid' 11x11
    Gaussian windows (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1."""
    x, y = np.float64(originals), np.float64(recons)
    w = gaussian_window()
    mx, my = _valid_filter(x, w), _valid_filter(y, w)
    sxx = _valid_filter(x * x, w) - mx * mx
    syy = _valid_filter(y * y, w) - my * my
    sxy = _valid_filter(x * y, w) - mx * my
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) *
                                                        (sxx + syy + c2))
    return ssim_map.mean(axis=(1, 2))


def gradient_energy(images: np.ndarray) -> np.ndarray:
    """Per-image mean squared finite difference along x plus that along y."""
    images = np.float64(images)
    dx, dy = np.diff(images, axis=2), np.diff(images, axis=1)
    return np.square(dx).mean(axis=(1, 2)) + np.square(dy).mean(axis=(1, 2))


def image_metrics(originals: np.ndarray, recons: np.ndarray) -> dict[str, float]:
    """recon_mse, psnr, ssim and sharpness of reconstructions ([N, 28, 28] in [0, 1])."""
    return {"recon_mse": float(np.mean(np.square(np.float64(originals) - recons))),
            "psnr": float(psnr(originals, recons).mean()),
            "ssim": float(ssim(originals, recons).mean()),
            "sharpness": float(gradient_energy(recons).mean()
                               / gradient_energy(originals).mean())}


# ---------------------------------------------------------------- latent statistics
def kl_per_dim(mean: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """Mean over images of each latent dimension's KL to N(0, 1), in nats [D]."""
    return np.asarray(losses.gaussian_kl(mean[..., None], logvar[..., None])).mean(0)


def active_units(posterior_means: np.ndarray,
                 threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Dimensions d whose posterior mean varies across inputs: Var_x(E_q[z_d]) > threshold."""
    return int(np.sum(np.var(np.float64(posterior_means), axis=0) > threshold))


# ---------------------------------------------------------------- Fréchet distance
def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of features [N, F]."""
    features = np.float64(features)
    return features.mean(0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (round-off negatives clipped)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray,
                     cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Fréchet (2-Wasserstein)
    distance between Gaussians fitted to two feature sets.

    Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2), a symmetric PSD matrix, so both
    roots are eigen-decompositions and stay real and stable. The features come from
    fvae's own small Fashion-MNIST classifier (fvae.classifier): this is NOT the
    Inception FID of GAN papers and its values are not comparable with them, only with
    other fvae runs scored by the same cached classifier and the same sample count.
    """
    root1 = _psd_sqrt(cov1)
    middle = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    trace_sqrt = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(np.sum(np.square(mu1 - mu2)) + np.trace(cov1) + np.trace(cov2)
                 - 2 * trace_sqrt)


def features_fd(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets [N, F]."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


# ---------------------------------------------------------------- IWAE bound
def _eps(key: jax.Array, image_ids: jax.Array, sample_ids: jax.Array,
         latent_dim: int) -> jax.Array:
    """N(0, I) noise [S, B, D]; draw k of image i depends only on (key, i, k), so the
    estimate does not depend on how images and samples are batched."""
    def one(k, i):
        return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), k),
                                 (latent_dim,))
    return jax.vmap(lambda k: jax.vmap(lambda i: one(k, i))(image_ids))(sample_ids)


@functools.partial(jax.jit, static_argnames=("model", "loss_config", "num_samples", "chunk"))
def _draws(model, loss_config, params, images, image_ids, key, num_samples: int, chunk: int,
           log_sigma=None):
    """(log w, -log p(x|z)), both [K, B], for K posterior draws z_k of each image:
    log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x). A scan over chunks of `chunk`
    draws decodes chunk * B latents per step, which bounds memory. `log_sigma`: see
    losses.negative_log_likelihood."""
    x = models.to_float(images)
    mean, logvar = models.encode(model, params, x)
    xs = jnp.broadcast_to(x, (chunk, *x.shape)).reshape(-1, *x.shape[1:])

    means, log_sigmas = jnp.tile(mean, (chunk, 1)), jnp.tile(0.5 * logvar, (chunk, 1))

    def body(_, c):
        eps = _eps(key, image_ids, c * chunk + jnp.arange(chunk), mean.shape[-1])
        z = (mean + jnp.exp(0.5 * logvar) * eps).reshape(-1, mean.shape[-1])  # [S*B, D]
        nll = losses.negative_log_likelihood(models.decode(model, params, z), xs, loss_config,
                                             log_sigma)
        log_w = -nll - losses.gaussian_nll(0.0, 0.0, z) + losses.gaussian_nll(
            means, log_sigmas, z)
        return None, (log_w.reshape(chunk, -1), nll.reshape(chunk, -1))

    _, (log_w, nll) = jax.lax.scan(body, None, jnp.arange(-(-num_samples // chunk)))
    b = x.shape[0]
    return log_w.reshape(-1, b)[:num_samples], nll.reshape(-1, b)[:num_samples]


def log_importance_weights(model: models.VAE, params, images: jax.Array, key: jax.Array,
                           num_samples: int, loss_config: ml_collections.ConfigDict,
                           chunk: int | None = None) -> jax.Array:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), [K, B], for K draws z_k ~ q(z|x)
    of each image of a batch, decoded `chunk` draws at a time (default: all K)."""
    chunk = chunk or num_samples
    log_w, _ = _draws(model, _frozen(loss_config), params, images,
                      jnp.arange(len(images)), key, num_samples, chunk)
    return log_w


def iwae_bound(log_w: jax.Array) -> jax.Array:
    """The IWAE lower bound on log p(x) per image (Burda et al. 2016) from log w [K, B]:
    logsumexp_k log w_k - log K (stable). It never exceeds log p(x) in expectation,
    tightens as K grows, and for the same draws is >= their mean log w (the ELBO).

    Units: nats per image. For continuous densities (mse, gaussian,
    continuous_bernoulli) it bounds a density of pixels scaled to [0, 1]: its value,
    and the bits per dimension derived from it, compare only with models of the same
    data scaling, never with the discrete bpd of 8-bit images (a probability of a
    bin of width 1/255 is about density / 255, log 255 nats per pixel apart, and
    needs dequantised training to be a bound) nor with a Bernoulli NLL. Only the
    discretized_logistic gives a probability of the 8-bit image, whose bpd is the
    one in published tables. A gaussian_variance='optimal' model is scored with one
    sigma fitted on the training split (gaussian_log_sigma, `gaussian_log_sigma` in
    eval.json).
    """
    return jax.nn.logsumexp(log_w, axis=0) - jnp.log(log_w.shape[0])


# A bound whose gain between the last two K is within the standard error of that gain,
# or within this many nats, has levelled off: a tenth of a nat per image is below what
# any comparison in the study turns on.
LEVELLED_OFF_NATS = 0.1


def k_ladder(num_samples: int) -> tuple[int, ...]:
    """The numbers of draws the bound is also reported at: 1, 10, 100, ... and K."""
    ks, k = [], 1
    while k < num_samples:
        ks.append(k)
        k *= 10
    return (*ks, num_samples)


def effective_sample_size(log_w: jax.Array) -> jax.Array:
    """(sum w)^2 / sum w^2 of the importance weights over axis 0, per image: from 1
    (one draw carries all the weight) to K (all weigh the same)."""
    return jnp.exp(2 * jax.nn.logsumexp(log_w, axis=0) - jax.nn.logsumexp(2 * log_w, axis=0))


@functools.partial(jax.jit, static_argnames=("model", "loss_config", "num_samples", "chunk"))
def _bounds(model, loss_config, params, images, image_ids, key, num_samples: int,
            chunk: int, log_sigma=None):
    """Per image, from one set of K draws (decoded once): the IWAE bound on log p(x) and
    the bound from the first k draws for each k of k_ladder(K), the mean of
    -log p(x|z), the negative ELBO (-mean log w) and the effective sample size."""
    log_w, nll = _draws(model, loss_config, params, images, image_ids, key, num_samples,
                        chunk, log_sigma)
    by_k = jnp.stack([iwae_bound(log_w[:k]) for k in k_ladder(num_samples)], axis=-1)
    return {"log_px": by_k[:, -1], "nll": nll.mean(0), "elbo": -log_w.mean(0),
            "ess": effective_sample_size(log_w), "log_px_by_k": by_k}


def likelihood_bounds(model: models.VAE, params, loss_config: ml_collections.ConfigDict,
                      images: np.ndarray, key: jax.Array, num_samples: int,
                      decode_batch: int = 0, progress: bool = False, desc: str = "iwae",
                      devices: Sequence[jax.Device] = (), log_sigma: float | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(IWAE bound on log p(x), mean -log p(x|z)) per image with K = num_samples: the
    first two of importance_sampled's results."""
    out = importance_sampled(model, params, loss_config, images, key, num_samples,
                             decode_batch, progress, desc, devices, log_sigma)
    return out["log_px"], out["nll"]


def importance_sampled(model: models.VAE, params, loss_config: ml_collections.ConfigDict,
                       images: np.ndarray, key: jax.Array, num_samples: int,
                       decode_batch: int = 0, progress: bool = False, desc: str = "iwae",
                       devices: Sequence[jax.Device] = (), log_sigma: float | None = None
                       ) -> dict[str, np.ndarray]:
    """Per image, from K = num_samples posterior draws: 'log_px' (the IWAE bound),
    'log_px_by_k' ([N, len(k_ladder(K))], the bound from the first k of the same
    draws), 'nll' (mean -log p(x|z)), 'elbo' (the negative ELBO of the same draws) and
    'ess' (the importance weights' effective sample size).

    Each compiled call takes B images and scans over chunks of S draws with
    S * B <= decode_batch decoder inputs per step (S = K split as evenly as possible;
    0: default_decode_batch()); calls are dealt across `devices` (default: JAX's
    default device). The result does not depend on the batching or the devices, except
    for gaussian_variance='optimal' without `log_sigma` (gaussian_log_sigma), whose
    sigma is then fitted to each decoded batch.
    """
    decode_batch = decode_batch or default_decode_batch()
    num_chunks = -(-num_samples // decode_batch)
    chunk = -(-num_samples // num_chunks)
    batch = max(1, decode_batch // chunk)
    frozen = _frozen(loss_config)
    fn = lambda shared, batch_images, ids: _bounds(  # noqa: E731
        model, frozen, shared[0], batch_images, ids, shared[1], num_samples, chunk, shared[2])
    fixed = None if log_sigma is None else np.float32(log_sigma)
    return map_batches(fn, (params, key, fixed), images, batch, with_ids=True,
                       devices=devices, desc=desc, progress=progress)


@functools.partial(jax.jit, static_argnames=("model", "loss_config"))
def _squared_errors(model, loss_config, params, images, image_ids, key):
    """Per image: the squared error summed over pixels of the pixel means decoded from
    one posterior draw (as training's reparameterised sample)."""
    x = models.to_float(images)
    mean, logvar = models.encode(model, params, x)
    z = mean + jnp.exp(0.5 * logvar) * _eps(key, image_ids, jnp.arange(1), mean.shape[-1])[0]
    recon = losses.pixel_mean(models.decode(model, params, z), loss_config)
    return (jnp.sum(jnp.square(recon - x).reshape(len(x), -1), -1),)


def gaussian_log_sigma(model: models.VAE, params, loss_config: ml_collections.ConfigDict,
                       images: np.ndarray, key: jax.Array, batch_size: int,
                       devices: Sequence[jax.Device] = ()) -> float:
    """The one log sigma with which evaluation scores a gaussian_variance='optimal' model:
    the maximum-likelihood sigma over `images` (the training split), sigma^2 = the mean
    squared error per pixel of reconstructions from one posterior draw per image: the
    statistic training fits to each batch, fitted once to all of them and floored as
    there. With it the ELBO and the IWAE bound are those of one fixed model."""
    frozen = _frozen(loss_config)
    fn = lambda shared, batch_images, ids: _squared_errors(  # noqa: E731
        model, frozen, shared[0], batch_images, ids, shared[1])
    (errors,) = map_batches(fn, (params, key), images, batch_size, with_ids=True,
                            devices=devices, desc="fit sigma")
    mse = np.mean(np.float64(errors)) / losses.NUM_PIXELS
    return max(0.5 * math.log(mse), losses.GAUSSIAN_MIN_LOG_SIGMA)


# ---------------------------------------------------------------- model passes
def _frozen(loss_config) -> ml_collections.FrozenConfigDict:
    """A hashable loss config, so compiled functions are cached across calls."""
    return ml_collections.FrozenConfigDict(loss_config)


def _as_images(logits: jax.Array, loss_config) -> jax.Array:
    """[B, 28, 28] pixel means of decoder outputs."""
    return losses.pixel_mean(logits, loss_config).reshape(logits.shape[0], 28, 28)


@functools.partial(jax.jit, static_argnames=("model", "loss_config"))
def _posterior_pass(model, loss_config, params, images):
    """Posterior mean and log-variance, and the reconstruction from the mean."""
    mean, logvar = models.encode(model, params, images)
    return mean, logvar, _as_images(models.decode(model, params, mean), loss_config)


@functools.partial(jax.jit, static_argnames=("model", "loss_config", "num", "latent_dim"))
def _prior_samples(model, loss_config, params, key, num: int, latent_dim: int):
    mean_fn = functools.partial(losses.pixel_mean, loss_config=loss_config)
    return (models.sample(model, params, key, num, latent_dim, mean_fn).reshape(num, 28, 28),)


def posterior_pass(model: models.VAE, params, loss_config: ml_collections.ConfigDict,
                   images: np.ndarray, batch_size: int, progress: bool = False,
                   desc: str = "encode", devices: Sequence[jax.Device] = ()
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, logvar, reconstruction from the mean) for every image, batched (across
    `devices`, default: JAX's default device)."""
    fn = functools.partial(_posterior_pass, model, _frozen(loss_config))
    return map_batches(fn, params, images, batch_size, devices=devices, desc=desc,
                       progress=progress)


def prior_samples(model: models.VAE, params, loss_config: ml_collections.ConfigDict,
                  key: jax.Array, num: int, latent_dim: int, batch_size: int,
                  progress: bool = False, devices: Sequence[jax.Device] = ()) -> np.ndarray:
    """Pixel means [num, 28, 28] of images decoded from prior draws, batched (across
    `devices`, default: JAX's default device)."""
    frozen = _frozen(loss_config)
    fn = lambda params_key, ids_batch, ids: _prior_samples(  # noqa: E731
        model, frozen, params_key[0], jax.random.fold_in(params_key[1], int(ids[0])),
        len(ids), latent_dim)
    return map_batches(fn, (params, key), np.arange(num), batch_size, with_ids=True,
                       devices=devices, desc="samples", progress=progress)[0]


def model_inputs(config: ml_collections.ConfigDict, images: np.ndarray,
                 seed: int = binarize.TEST_SEED) -> np.ndarray:
    """The images the model is scored on: as stored, or binarised once with a fixed
    key when the run was trained with data.binarize='dynamic'."""
    if config.data.binarize == "dynamic":
        return binarize.binarize_fixed(images, seed)
    return images


# ---------------------------------------------------------------- latent probe
@functools.partial(jax.jit, static_argnames=("steps", "num_classes"))
def _fit_logistic(x, y, steps: int, l2: float, num_classes: int):
    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros(num_classes)}

    def loss(p):
        logits = x @ p["w"] + p["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + l2 * jnp.sum(jnp.square(p["w"]))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params


def probe_accuracy(train_z: np.ndarray, train_labels: np.ndarray, test_z: np.ndarray,
                   test_labels: np.ndarray, steps: int = 200, l2: float = 1e-4) -> float:
    """Test accuracy of multinomial logistic regression (standardised inputs, L2 on the
    weights, L-BFGS) fitted to training latents: how linearly readable the class is."""
    mu, sd = train_z.mean(0), train_z.std(0) + 1e-6
    standard = lambda z: jnp.asarray((z - mu) / sd, jnp.float32)  # noqa: E731
    p = _fit_logistic(standard(train_z), jnp.asarray(train_labels, jnp.int32), steps, l2,
                      len(data.CLASS_NAMES))
    predictions = np.asarray(jnp.argmax(standard(test_z) @ p["w"] + p["b"], -1))
    return float(np.mean(predictions == test_labels))


# ---------------------------------------------------------------- entry points
def epoch_image_metrics(model: models.VAE, params, config: ml_collections.ConfigDict,
                        images: np.ndarray, inputs: np.ndarray | None = None
                        ) -> dict[str, float]:
    """active_units, recon_mse, psnr, ssim and sharpness: one encode-decode pass, for
    logging every epoch (same protocol and names as eval.json). `inputs`: what the model
    sees of `images`, as model_inputs makes them (the default: the test set's).
    Deterministic."""
    originals = images.astype(np.float32) / 255.0
    inputs = model_inputs(config, images) if inputs is None else inputs
    mean, _, recons = posterior_pass(model, parallel.host_local(params), config.loss, inputs,
                                     config.runtime.eval_batch_size,
                                     devices=parallel.local_devices(config.runtime.num_devices))
    return {"active_units": active_units(mean), **image_metrics(originals, recons)}


def iwae_summary(draws: dict[str, np.ndarray], num_samples: int) -> dict:
    """eval.json's IWAE keys from importance_sampled's per-image results: the bound
    (-log p(x), nats) with its standard error over images, the same at each k of
    k_ladder(K), the negative ELBO of the same images and draws, the effective sample
    size (mean, 5th percentile over images), and whether the bound has levelled off:
    its gain between the last two k (same images, same draws, so paired) within the
    standard error of that gain or LEVELLED_OFF_NATS. (The spread over images, iwae_nll_se, is far wider
    than the Monte Carlo error of a change in K, and would hide a bound still falling.)"""
    n = len(draws["log_px"])
    se = lambda x: float(np.std(x, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")  # noqa
    columns = np.asarray(draws["log_px_by_k"], np.float64).T
    by_k = [{"k": k, "iwae_nll": float(-np.mean(column)), "se": se(column)}
            for k, column in zip(k_ladder(num_samples), columns)]
    summary = {"iwae_nll": by_k[-1]["iwae_nll"], "iwae_nll_se": by_k[-1]["se"],
               "iwae_by_k": by_k, "iwae_elbo": float(np.mean(draws["elbo"])),
               "iwae_ess_mean": float(np.mean(draws["ess"])),
               "iwae_ess_p5": float(np.percentile(draws["ess"], 5)),
               "iwae_last_gain": None, "iwae_last_gain_se": None, "iwae_levelled_off": None}
    if len(columns) > 1 and n > 1:  # (one K or one image: nothing to judge)
        gain = columns[-1] - columns[-2]
        summary.update(iwae_last_gain=float(np.mean(gain)), iwae_last_gain_se=se(gain),
                       iwae_levelled_off=bool(abs(np.mean(gain)) <= max(
                           se(gain), LEVELLED_OFF_NATS)))
    return summary


def full_evaluation(model: models.VAE, params, config: ml_collections.ConfigDict,
             dataset: data.Dataset, progress: bool = True) -> dict:
    """Every metric of eval.json (see the module docstring) for one model, its batches
    dealt across this process's devices (runtime.num_devices; 0: all)."""
    ec, batch = config.eval, config.runtime.eval_batch_size
    devices = parallel.local_devices(config.runtime.num_devices)
    params = parallel.host_local(params)
    key = jax.random.key(ec.seed)
    originals_u8 = dataset.test_images
    originals = originals_u8.astype(np.float32) / 255.0
    inputs = model_inputs(config, originals_u8)
    n = len(inputs)
    results: dict = {"num_test_images": n}

    mean, logvar, recons = posterior_pass(model, params, config.loss, inputs, batch,
                                          progress, "encode test", devices)
    kl = np.asarray(losses.gaussian_kl(mean, logvar))
    train_inputs = model_inputs(config, dataset.train_images,
                                binarize.TEST_SEED + PROBE_SEED_OFFSET)
    log_sigma = None  # one fixed Gaussian for an 'optimal'-variance model, see losses
    if config.loss.likelihood == "gaussian" and config.loss.gaussian_variance == "optimal":
        log_sigma = gaussian_log_sigma(model, params, config.loss, train_inputs,
                                       jax.random.fold_in(key, 3), batch, devices)
        results["gaussian_log_sigma"] = log_sigma
    _, nll = likelihood_bounds(model, params, config.loss, inputs, jax.random.fold_in(key, 0),
                               ec.elbo_samples, ec.iwae_decode_batch, progress, "elbo",
                               devices, log_sigma)
    results.update(elbo=float(np.mean(nll + kl)), nll_recon=float(nll.mean()),
                   kl=float(kl.mean()))

    num_iwae = min(ec.iwae_num_images or n, n)
    start = time.time()
    draws = importance_sampled(model, params, config.loss, inputs[:num_iwae],
                               jax.random.fold_in(key, 1), ec.iwae_samples,
                               ec.iwae_decode_batch, progress, f"iwae K={ec.iwae_samples}",
                               devices, log_sigma)
    results.update(iwae_summary(draws, ec.iwae_samples), iwae_samples=ec.iwae_samples,
                   iwae_num_images=num_iwae, iwae_seconds=time.time() - start)
    if results["iwae_levelled_off"] is False:
        (last, prev) = results["iwae_by_k"][-1], results["iwae_by_k"][-2]
        logging.warning("the IWAE bound still moves: %.3f nats from K=%d to K=%d, more than "
                        "the standard error of that change (%.3f) and %g nats; raise "
                        "eval.iwae_samples for a tighter bound", results["iwae_last_gain"],
                        prev["k"], last["k"], results["iwae_last_gain_se"],
                        LEVELLED_OFF_NATS)
    if config.loss.likelihood not in NATS_ONLY_LIKELIHOODS:
        results["iwae_bpd"] = results["iwae_nll"] / (losses.NUM_PIXELS * math.log(2))

    results.update(kl_per_dim=kl_per_dim(mean, logvar).tolist(),
                   active_units=active_units(mean), **image_metrics(originals, recons))

    clf = classifier.load_or_train(dataset.train_images, dataset.train_labels, originals_u8,
                                   dataset.test_labels, ec.classifier_epochs,
                                   ec.classifier_dir, progress)
    num_fd = ec.fd_num_samples or n
    samples = prior_samples(model, params, config.loss, jax.random.fold_in(key, 2), num_fd,
                            config.model.latent_dim, batch, progress, devices)
    test_features = classifier.features(clf, originals)
    results.update(classifier_test_accuracy=clf.test_accuracy, fd_num_samples=num_fd,
                   fd_samples=features_fd(classifier.features(clf, samples), test_features),
                   fd_recons=features_fd(classifier.features(clf, recons), test_features))

    train_mean, _, _ = posterior_pass(model, params, config.loss, train_inputs, batch,
                                      progress, "encode train", devices)
    results["probe_accuracy"] = probe_accuracy(train_mean, dataset.train_labels, mean,
                                               dataset.test_labels, ec.probe_steps,
                                               ec.probe_l2)
    return results

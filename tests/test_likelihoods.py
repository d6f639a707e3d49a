"""The likelihoods of issue 8 against references that are obviously right: closed
forms in high precision (mpmath), numerical integration over [0, 1], sums over the
256 pixel values; the decoder trees they must leave alone; a tiny run of each."""

import math

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

from conftest import loss_config
from fvae import configs, losses, models, train
from fvae.writer import read_metrics

mpmath.mp.dps = 40
CB_LOGITS = [0.0, 1e-6, 1e-3, 0.1, 0.3, 0.49, 0.4999999, 0.5, 0.5000001, 0.51, 1.0, 2.5,
             10.0, 30.0, 88.0, 200.0, 1e4]
CB_LOGITS = sorted({s * v for v in CB_LOGITS for s in (1.0, -1.0)})


def pixels(values) -> jnp.ndarray:
    """Values as a batch of one-pixel images [N, 1, 1, 1]: per-image sums are per pixel."""
    return jnp.asarray(np.asarray(values, np.float32).reshape(-1, 1, 1, 1))


def f32(values) -> list[float]:
    """The float32 values the model actually sees, as Python floats."""
    return [float(v) for v in np.asarray(values, np.float32)]


def mp_log_norm(l):
    """log C(sigmoid(l)) = log(2 artanh(1 - 2s) / (1 - 2s)), the paper's form, with
    enough digits that 1 - 2s keeps s = sigmoid(l) even for |l| = 1e4."""
    if l == 0:
        return mpmath.log(2)
    with mpmath.workdps(40 + int(abs(l))):
        s = 1 / (1 + mpmath.exp(-mpmath.mpf(l)))
        return +mpmath.log(2 * mpmath.atanh(1 - 2 * s) / (1 - 2 * s))


def log_density_f64(l, x):
    """log C + x log s + (1 - x) log(1 - s) in float64, log C from mpmath."""
    return float(mp_log_norm(l)) - x * np.logaddexp(0, -l) - (1 - x) * np.logaddexp(0, l)


def gauss_legendre_01(nodes_per_panel: int = 40):
    """Nodes and weights on [0, 1], with panels refined geometrically towards both ends
    (a continuous Bernoulli with large |logit| is an exponential of scale 1/|logit|)."""
    half = [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.25]
    breaks = np.array(half + [0.5] + [1 - b for b in reversed(half)])
    t, w = np.polynomial.legendre.leggauss(nodes_per_panel)
    lo, hi = breaks[:-1, None], breaks[1:, None]
    return ((hi - lo) / 2 * t + (hi + lo) / 2).ravel(), ((hi - lo) / 2 * w).ravel()


# ---------------------------------------------------------------- continuous Bernoulli
def test_cb_log_norm_matches_high_precision():
    got = losses.continuous_bernoulli_log_norm(jnp.asarray(CB_LOGITS, jnp.float32))
    expected = [float(mp_log_norm(l)) for l in f32(CB_LOGITS)]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_cb_log_norm_gradient_matches_high_precision():
    grad = jax.vmap(jax.grad(losses.continuous_bernoulli_log_norm))
    got = grad(jnp.asarray(CB_LOGITS, jnp.float32))
    # d/dl log(l / tanh(l/2)) = 1/l - 1/sinh(l), in 40 digits.
    expected = [float(1 / mpmath.mpf(l) - 1 / mpmath.sinh(l)) if l else 0.0
                for l in f32(CB_LOGITS)]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fn", [losses.continuous_bernoulli_log_norm,
                                losses.continuous_bernoulli_mean])
def test_cb_taylor_branch_is_continuous_at_the_switch(fn):
    r = losses.CB_TAYLOR_RADIUS
    inside, outside = np.nextafter(np.float32(r), np.float32(0)), np.float32(r)
    for sign in (1, -1):
        a, b = fn(jnp.float32(sign * inside)), fn(jnp.float32(sign * outside))
        assert abs(float(a) - float(b)) < 2e-7
        ga, gb = jax.grad(fn)(jnp.float32(sign * inside)), jax.grad(fn)(jnp.float32(sign * outside))
        assert abs(float(ga) - float(gb)) < 1e-5


def test_cb_density_integrates_to_one():
    x, w = gauss_legendre_01()
    logits = np.asarray(CB_LOGITS, np.float32)[:-1]  # 1e4: scale 1e-4, below the grid
    nll = losses.continuous_bernoulli_nll(
        pixels(np.broadcast_to(logits[:, None], (len(logits), len(x)))),
        pixels(np.broadcast_to(x[None, :], (len(logits), len(x)))))
    density = np.exp(-np.float64(np.asarray(nll))).reshape(len(logits), len(x))
    np.testing.assert_allclose(density @ w, 1.0, rtol=2e-5)


def test_cb_nll_matches_the_closed_form():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(3, 28, 28, 1)).astype(np.float32)
    logits = rng.normal(scale=4.0, size=(3, 28, 28, 1)).astype(np.float32)
    logits.flat[:3] = [0.0, 1e-4, -0.5]
    s = 1 / (1 + np.exp(-np.float64(logits)))
    log_c = np.vectorize(lambda l: float(mp_log_norm(l)))(np.float64(logits))
    expected = -(log_c + x * np.log(s) + (1 - x) * np.log1p(-s)).reshape(3, -1).sum(-1)
    got = losses.negative_log_likelihood(jnp.asarray(logits), jnp.asarray(x),
                                         loss_config("continuous_bernoulli"))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_cb_mean_matches_numerical_integration():
    logits = f32(CB_LOGITS)
    got = np.asarray(losses.pixel_mean(pixels(logits), loss_config("continuous_bernoulli")))
    got = got.ravel()
    x, w = gauss_legendre_01()
    density = np.exp([log_density_f64(l, x) for l in logits])
    np.testing.assert_allclose(density @ w, 1.0, rtol=1e-6)  # the reference is exact
    np.testing.assert_allclose(got, density @ (w * x), atol=2e-6)
    assert np.all(np.diff(got) > -1e-6)  # increasing in the logit (to rounding), in [0, 1]
    assert float(got[0]) >= 0.0 and float(got[-1]) <= 1.0


def test_cb_is_stable_for_extreme_logits():
    logits = pixels([-1e4, -1e4, 1e4, 1e4, 0.0])
    x = pixels([0.0, 1.0, 0.0, 1.0, 0.5])
    nll, grad = jax.value_and_grad(
        lambda l: losses.continuous_bernoulli_nll(l, x).sum())(logits)
    assert np.isfinite(nll) and np.all(np.isfinite(grad))
    each = np.asarray(losses.continuous_bernoulli_nll(logits, x)).ravel()
    # An exponential of rate 1e4 on the near end: density 1e4 there, e^-1e4 far away.
    np.testing.assert_allclose(each[[0, 3]], -math.log(1e4), rtol=1e-5)
    np.testing.assert_allclose(each[[1, 2]], 1e4 - math.log(1e4), rtol=1e-5)


# ---------------------------------------------------------------- Gaussian
def np_gaussian_nll(mu, log_sigma, x):
    z = (x - mu) / np.exp(log_sigma)
    return (0.5 * z ** 2 + log_sigma + 0.5 * np.log(2 * np.pi)).reshape(len(x), -1).sum(-1)


def np_softclip(v, minimum):
    return minimum + np.logaddexp(0.0, v - minimum)


@pytest.fixture
def images():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(4, 28, 28, 1)).astype(np.float32)
    logits = rng.normal(size=(4, 28, 28, 1)).astype(np.float32)
    return x, logits


def test_gaussian_learned_is_the_gaussian_nll(images):
    x, logits = images
    out = jnp.concatenate([logits, jnp.full_like(logits, -2.3)], -1)
    got = losses.negative_log_likelihood(out, jnp.asarray(x),
                                         loss_config("gaussian", gaussian_variance="learned"))
    log_sigma = np_softclip(-2.3, losses.GAUSSIAN_MIN_LOG_SIGMA)  # the soft floor
    mu = 1 / (1 + np.exp(-np.float64(logits)))
    np.testing.assert_allclose(got, np_gaussian_nll(mu, log_sigma, np.float64(x)), rtol=1e-5)


def test_gaussian_optimal_uses_the_batch_mse_as_a_constant(images):
    x, logits = images
    config = loss_config("gaussian", gaussian_variance="optimal")
    mu = 1 / (1 + np.exp(-np.float64(logits)))
    sigma2 = np.mean((np.float64(x) - mu) ** 2)
    got = losses.negative_log_likelihood(jnp.asarray(logits), jnp.asarray(x), config)
    np.testing.assert_allclose(got, np_gaussian_nll(mu, 0.5 * np.log(sigma2), np.float64(x)),
                               rtol=1e-5)
    # It is the maximum-likelihood shared sigma: any other constant sigma does worse.
    learned = loss_config("gaussian", gaussian_variance="learned")
    for factor in (0.98, 1.02):
        log_sigma = math.log(factor) + 0.5 * math.log(sigma2)
        m = losses.GAUSSIAN_MIN_LOG_SIGMA
        raw = m + math.log(math.expm1(log_sigma - m))  # softclip(raw) = log_sigma
        out = jnp.concatenate([logits, jnp.full_like(logits, raw)], -1)
        assert float(losses.negative_log_likelihood(out, jnp.asarray(x), learned).sum()) > \
            float(got.sum())
    # The gradient treats sigma as a constant: that of sum (x - mu)^2 / (2 sigma^2).
    grad = jax.grad(lambda l: losses.reconstruction_loss(l, jnp.asarray(x), config).sum())(
        jnp.asarray(logits))
    expected = -(np.float64(x) - mu) * mu * (1 - mu) / sigma2
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("variance", ["learned", "optimal"])
def test_gaussian_pixel_mean_is_the_sigmoid_of_the_location(images, variance):
    _, logits = images
    out = jnp.concatenate([logits, jnp.zeros_like(logits)], -1) if variance == "learned" \
        else jnp.asarray(logits)
    mean = losses.pixel_mean(out, loss_config("gaussian", gaussian_variance=variance))
    np.testing.assert_allclose(mean, jax.nn.sigmoid(logits), rtol=1e-6)


# ---------------------------------------------------------------- discretized logistic
def np_logistic_probs(loc, log_scale):
    """P(k), k = 0..255, in float64: logistic CDF differences, edge bins to +-inf."""
    scale = np.exp(np_softclip(log_scale, losses.LOGISTIC_MIN_LOG_SCALE))
    edges = (np.arange(1, 256) - 0.5) / 255
    cdf = 0.5 * (1 + np.tanh((edges - loc) / (2 * scale)))
    return np.diff(np.concatenate([[0.0], cdf, [1.0]]))


DL_PARAMS = [(loc, ls) for loc in (-5.0, -0.01, 0.0, 0.3, 0.5, 1.0, 1.01, 5.0)
             for ls in (-12.0, -8.0, -5.0, -2.0, 0.0, 3.0)]


def dl_out(loc, log_scale, n):
    return jnp.concatenate([pixels([loc] * n), pixels([log_scale] * n)], -1)


@pytest.mark.parametrize("loc,log_scale", DL_PARAMS)
def test_discretized_logistic_sums_to_one_and_matches_float64(loc, log_scale):
    values = pixels(np.arange(256) / 255)
    nll = losses.negative_log_likelihood(dl_out(loc, log_scale, 256), values,
                                         loss_config("discretized_logistic"))
    probs = np.exp(-np.float64(np.asarray(nll)))
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-5)
    expected = np_logistic_probs(loc, log_scale)
    np.testing.assert_allclose(probs, expected, atol=2e-6)
    big = expected > 1e-6
    np.testing.assert_allclose(np.asarray(nll)[big], -np.log(expected[big]), atol=1e-4)
    mean = losses.pixel_mean(dl_out(loc, log_scale, 1), loss_config("discretized_logistic"))
    np.testing.assert_allclose(float(mean.ravel()[0]), expected @ (np.arange(256) / 255),
                               atol=1e-5)


def test_discretized_logistic_snaps_to_the_nearest_level_and_has_finite_gradients():
    config = loss_config("discretized_logistic")
    x = pixels([0.0, 0.2, 1.0])
    snapped = losses.negative_log_likelihood(dl_out(0.2, -6.0, 3), x, config)
    off_grid = losses.negative_log_likelihood(dl_out(0.2, -6.0, 3), x + 0.4 / 255, config)
    np.testing.assert_allclose(off_grid, snapped, rtol=1e-6)
    out = jnp.concatenate([pixels([-50.0, 0.2, 50.0]), pixels([-20.0, -20.0, 10.0])], -1)
    grad = jax.grad(lambda o: losses.negative_log_likelihood(o, x, config).sum())(out)
    assert np.all(np.isfinite(grad))


def test_scale_likelihoods_need_a_scale_channel(images):
    _, logits = images
    with pytest.raises(ValueError, match="model.decoder_scale"):
        losses.negative_log_likelihood(jnp.asarray(logits), jnp.asarray(logits),
                                       loss_config("discretized_logistic"))


@pytest.mark.parametrize("likelihood", ["continuous_bernoulli", "gaussian",
                                        "discretized_logistic"])
def test_reconstruction_loss_is_the_nll(images, likelihood):
    x, logits = images
    out = jnp.concatenate([logits, jnp.full_like(logits, -3.0)], -1) \
        if likelihood == "discretized_logistic" else jnp.asarray(logits)
    config = loss_config(likelihood)
    np.testing.assert_array_equal(losses.reconstruction_loss(out, jnp.asarray(x), config),
                                  losses.negative_log_likelihood(out, jnp.asarray(x), config))


# ---------------------------------------------------------------- decoders and configs
BCE_DECODERS = {
    "conv": {"ConvTranspose_0/bias": (64,), "ConvTranspose_0/kernel": (3, 3, 128, 64),
             "ConvTranspose_1/bias": (32,), "ConvTranspose_1/kernel": (3, 3, 64, 32),
             "Conv_0/bias": (1,), "Conv_0/kernel": (3, 3, 32, 1), "Dense_0/bias": (6272,),
             "Dense_0/kernel": (32, 6272),
             **{f"ResBlock_{i}/Conv_{j}/{p}": (32,) if p == "bias" else (3, 3, 32, 32)
                for i in range(2) for j in range(2) for p in ("bias", "kernel")}},
    "keras": {"ConvTranspose_0/bias": (64,), "ConvTranspose_0/kernel": (3, 3, 64, 64),
              "ConvTranspose_1/bias": (32,), "ConvTranspose_1/kernel": (3, 3, 64, 32),
              "ConvTranspose_2/bias": (1,), "ConvTranspose_2/kernel": (3, 3, 32, 1),
              "Dense_0/bias": (3136,), "Dense_0/kernel": (32, 3136)},
}
LAST_LAYER = {"conv": "Conv_0", "keras": "ConvTranspose_2"}


def decoder_tree(name, scale="none"):
    c = configs.get_base_config()
    c.model.name, c.model.decoder_scale = name, scale
    model = models.build_model(c.model)
    params = jax.eval_shape(lambda k: models.init_params(model, k), jax.random.key(0))
    return {"/".join(str(k.key) for k in path): tuple(v.shape)
            for path, v in jax.tree_util.tree_leaves_with_path(params["decoder"])}


@pytest.mark.parametrize("name", ["conv", "keras"])
def test_decoder_scale_changes_only_what_it_adds(name):
    assert decoder_tree(name) == BCE_DECODERS[name]  # bce/mse checkpoints stay valid
    assert decoder_tree(name, "shared") == {**BCE_DECODERS[name], "log_scale": ()}
    last = LAST_LAYER[name]
    per_pixel = {**BCE_DECODERS[name], f"{last}/bias": (2,),
                 f"{last}/kernel": (3, 3, 32, 2)}
    assert decoder_tree(name, "per_pixel") == per_pixel


@pytest.mark.parametrize("scale", ["shared", "per_pixel"])
def test_decoder_outputs_a_log_scale_channel(scale):
    decoder = models.ConvDecoder((8, 8, 4), num_res_blocks=1, scale=scale)  # tiny
    out, _ = decoder.init_with_output(jax.random.key(0), jnp.ones((3, 2)))
    assert out.shape == (3, 28, 28, 2)
    if scale == "shared":
        np.testing.assert_array_equal(out[..., 1], 0.0)  # one log sigma, initialised to 0


@pytest.mark.parametrize("overrides,key", [
    ({"loss.likelihood": "gaussian", "loss.gaussian_variance": "learned"}, "decoder_scale"),
    ({"loss.likelihood": "discretized_logistic"}, "decoder_scale"),
    ({"loss.likelihood": "bce", "model.decoder_scale": "shared"}, "decoder_scale"),
    ({"loss.likelihood": "continuous_bernoulli", "loss.reduction": "mean"}, "loss.reduction"),
    ({"loss.likelihood": "gaussian", "loss.gaussian_variance": "fixed"}, "gaussian_variance"),
])
def test_configs_reject_mismatched_likelihoods(overrides, key):
    c = configs.get_base_config()
    for k, v in overrides.items():
        section, field = k.split(".")
        c[section][field] = v
    with pytest.raises(configs.ConfigError, match=key):
        configs.validate(c)


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("overrides", [
    {"loss.likelihood": "continuous_bernoulli"},
    {"loss.likelihood": "gaussian", "loss.gaussian_variance": "optimal"},
    {"loss.likelihood": "gaussian", "loss.gaussian_variance": "learned",
     "model.decoder_scale": "shared"},
    {"loss.likelihood": "discretized_logistic", "model.decoder_scale": "per_pixel"},
], ids=["cb", "gaussian_optimal", "gaussian_learned", "discretized_logistic"])
def test_a_tiny_run_finishes_with_finite_metrics(make_config, tmp_path, overrides):
    config = make_config(**{**overrides, "train.num_epochs": 1, "logging.writers": (),
                            "report.num_figure_images": 4})
    state = train.train_and_evaluate(config, str(tmp_path))
    records = read_metrics(tmp_path)
    assert {r["split"] for r in records} == {"train", "validation"}
    for r in records:
        values = [v for k, v in r.items() if isinstance(v, float)]
        assert values and all(math.isfinite(v) for v in values), r
        np.testing.assert_allclose(r["elbo"], r["recon"] + r["kl"], rtol=1e-5)  # beta 1
    assert (tmp_path / "figures" / "reconstructions.png").exists()
    if config.model.decoder_scale == "shared":
        assert float(state.params["decoder"]["log_scale"]) != 0.0  # sigma is learned


def test_gaussian_optimal_with_a_given_sigma_is_that_fixed_gaussian(images):
    """Evaluation's fixed sigma: each image's NLL is its own, whatever else is in the
    batch; the other likelihoods ignore it."""
    x, logits = images
    config = loss_config("gaussian", gaussian_variance="optimal")
    mu = 1 / (1 + np.exp(-np.float64(logits)))
    got = losses.negative_log_likelihood(jnp.asarray(logits), jnp.asarray(x), config, -1.7)
    np.testing.assert_allclose(got, np_gaussian_nll(mu, -1.7, np.float64(x)), rtol=1e-5)
    first = losses.negative_log_likelihood(jnp.asarray(logits[:1]), jnp.asarray(x[:1]),
                                           config, -1.7)
    np.testing.assert_allclose(first, got[:1], rtol=1e-6)
    bce = loss_config("bce")
    np.testing.assert_array_equal(
        losses.negative_log_likelihood(jnp.asarray(logits), jnp.asarray(x), bce, -1.7),
        losses.negative_log_likelihood(jnp.asarray(logits), jnp.asarray(x), bce))

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import loss_config
from fvae import losses


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(3, 28, 28, 1)).astype(np.float32)
    logits = rng.normal(scale=3.0, size=(3, 28, 28, 1)).astype(np.float32)
    return x, logits


def np_sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v.astype(np.float64)))


def test_bce_matches_numpy(batch):
    x, logits = batch
    p = np_sigmoid(logits)
    expected = -(x * np.log(p) + (1 - x) * np.log(1 - p)).reshape(3, -1).sum(-1)
    np.testing.assert_allclose(losses.bernoulli_nll(jnp.asarray(logits), jnp.asarray(x)),
                               expected, rtol=1e-5)


def test_bce_is_stable_for_extreme_logits():
    logits = jnp.full((1, 28, 28, 1), 200.0).at[0, 0, 0, 0].set(-200.0)
    x = jnp.ones((1, 28, 28, 1))
    value = losses.bernoulli_nll(logits, x)
    assert np.isfinite(value).all()
    np.testing.assert_allclose(value, [200.0], rtol=1e-5)  # one pixel costs 200 nats


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_mse_matches_numpy(batch, reduction):
    x, logits = batch
    sq = ((x - np_sigmoid(logits)) ** 2).reshape(3, -1)
    expected = sq.sum(-1) if reduction == "sum" else sq.mean(-1)
    np.testing.assert_allclose(losses.squared_error(jnp.asarray(logits), jnp.asarray(x),
                                                    reduction), expected, rtol=1e-5)


@pytest.mark.parametrize("reduction,variance", [("sum", 0.5), ("mean", 0.5 * 784)])
def test_mse_elbo_is_a_gaussian_nll_with_the_implied_variance(batch, reduction, variance):
    x, logits = batch
    mu = np_sigmoid(logits)
    logpdf = -0.5 * np.log(2 * np.pi * variance) - (x - mu) ** 2 / (2 * variance)
    expected = -logpdf.reshape(3, -1).sum(-1)
    got = losses.negative_log_likelihood(jnp.asarray(logits), jnp.asarray(x),
                                         loss_config("mse", reduction))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_kl_matches_monte_carlo():
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(2, 4))
    logvar = rng.normal(scale=0.5, size=(2, 4))
    std = np.exp(0.5 * logvar)
    z = mean + std * rng.standard_normal((200_000, 2, 4))
    log_q = -0.5 * (((z - mean) / std) ** 2 + logvar + np.log(2 * np.pi))
    log_p = -0.5 * (z ** 2 + np.log(2 * np.pi))
    mc = (log_q - log_p).sum(-1).mean(0)
    np.testing.assert_allclose(losses.gaussian_kl(jnp.asarray(mean), jnp.asarray(logvar)),
                               mc, atol=0.03)


def test_vae_loss_combines_parts(batch):
    x, logits = batch
    mean, logvar = jnp.ones((3, 2)), jnp.zeros((3, 2))
    loss, parts = losses.vae_loss(jnp.asarray(logits), mean, logvar, jnp.asarray(x), 0.1,
                                  loss_config("mse", "mean"))
    assert set(parts) == {"loss", "recon", "kl", "beta", "elbo"}
    np.testing.assert_allclose(parts["kl"], 1.0)  # 0.5 * sum(1 + 1 - 1 - 0) over 2 dims
    np.testing.assert_allclose(loss, parts["recon"] + 0.1 * parts["kl"], rtol=1e-6)
    # elbo is the beta = 1 bound: MSE-mean recon is far from it (that is the point).
    assert float(parts["elbo"]) > float(parts["recon"] + parts["kl"])


def test_beta_schedules():
    constant = losses.make_beta_schedule(loss_config(beta=0.5), 10, 100)
    assert float(constant(0)) == float(constant(99)) == 0.5
    linear = losses.make_beta_schedule(
        loss_config(beta=1.0, beta_schedule="linear", beta_start=0.2, warmup_epochs=2.0), 10, 100)
    np.testing.assert_allclose([linear(s) for s in (0, 10, 20, 50)], [0.2, 0.6, 1.0, 1.0],
                               rtol=1e-6)
    cyc = losses.make_beta_schedule(
        loss_config(beta=1.0, beta_schedule="cyclical", cycle_steps=10, cycle_ratio=0.5), 10, 100)
    np.testing.assert_allclose([cyc(s) for s in (0, 2, 5, 9, 10, 12)],
                               [0.0, 0.4, 1.0, 1.0, 0.0, 0.4], rtol=1e-6)

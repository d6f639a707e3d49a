import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import params_equal
from fvae import configs, models


def build(name: str, latent_dim: int):
    c = configs.get_base_config()
    c.model.name, c.model.latent_dim = name, latent_dim
    model = models.build_model(c.model)
    return model, models.init_params(model, jax.random.key(0))


def shapes(tree):
    return jax.tree.map(lambda a: a.shape, tree)


@pytest.mark.parametrize("latent_dim", [2, 32])
def test_study_model_layer_shapes(latent_dim):
    model, params = build("conv", latent_dim)
    enc, dec = shapes(params["encoder"]), shapes(params["decoder"])
    assert [enc[f"Conv_{i}"]["kernel"] for i in range(3)] == [
        (3, 3, 1, 32), (3, 3, 32, 64), (3, 3, 64, 128)]
    assert enc["Dense_0"]["kernel"] == (7 * 7 * 128, 256)
    assert enc["mean"]["kernel"] == enc["logvar"]["kernel"] == (256, latent_dim)
    assert dec["Dense_0"]["kernel"] == (latent_dim, 7 * 7 * 128)
    assert dec["ConvTranspose_0"]["kernel"] == (3, 3, 128, 64)
    assert dec["ConvTranspose_1"]["kernel"] == (3, 3, 64, 32)
    assert [dec[f"ResBlock_{i}"]["Conv_{}".format(j)]["kernel"]
            for i in range(2) for j in range(2)] == [(3, 3, 32, 32)] * 4
    assert dec["Conv_0"]["kernel"] == (3, 3, 32, 1)
    count = sum(x.size for x in jax.tree.leaves(params))
    # The study's model: 2,051,521 parameters at latent 32 (the figure the issue quotes).
    assert count == 2_051_521 - (32 - latent_dim) * (2 * 257 + 6272)


def test_initialisation_draws_what_flax_init_draws():
    """init_params compiles with less LLVM optimisation on a CPU, to save ~7 s a run;
    the parameters must be the same bits as a plainly compiled model.init."""
    model = models.build_model(configs.get_base_config().model)
    init_key, sample_key = jax.random.split(jax.random.key(3))
    plain = jax.jit(model.init)(init_key, jnp.zeros((1, 28, 28, 1)), sample_key)["params"]
    assert params_equal(models.init_params(model, jax.random.key(3)), plain)


def test_keras_model_matches_the_keras_example():
    model, params = build("keras", 2)
    assert sum(x.size for x in jax.tree.leaves(params["encoder"])) == 69_076
    assert sum(x.size for x in jax.tree.leaves(params["decoder"])) == 65_089


@pytest.mark.parametrize("name,latent_dim", [("conv", 2), ("conv", 32), ("keras", 2)])
def test_pure_functions_shapes(name, latent_dim):
    model, params = build(name, latent_dim)
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (5, 28, 28)), jnp.uint8)
    mean, logvar = models.encode(model, params, images)
    assert mean.shape == logvar.shape == (5, latent_dim)
    assert models.decode(model, params, mean).shape == (5, 28, 28, 1)
    recon = models.reconstruct(model, params, images, jax.random.key(1), mean_fn=jax.nn.sigmoid)
    samples = models.sample(model, params, jax.random.key(2), 3, latent_dim, jax.nn.sigmoid)
    assert recon.shape == (5, 28, 28, 1) and samples.shape == (3, 28, 28, 1)
    assert float(recon.min()) >= 0 and float(recon.max()) <= 1
    # Without a key the reconstruction is deterministic (posterior mean).
    np.testing.assert_array_equal(models.reconstruct(model, params, images, mean_fn=jnp.tanh),
                                  models.reconstruct(model, params, images, mean_fn=jnp.tanh))


def test_reparameterize_has_the_right_moments():
    mean, logvar = jnp.array([1.5, -2.0]), jnp.log(jnp.array([0.25, 4.0]))
    z = jax.vmap(lambda k: models.reparameterize(k, mean, logvar))(
        jax.random.split(jax.random.key(0), 20000))
    np.testing.assert_allclose(z.mean(0), mean, atol=0.05)
    np.testing.assert_allclose(z.var(0), jnp.exp(logvar), rtol=0.05)
    # Explicit keys: the same key gives the same draw, another key another draw.
    k = jax.random.key(3)
    assert jnp.array_equal(models.reparameterize(k, mean, logvar),
                           models.reparameterize(k, mean, logvar))
    assert not jnp.array_equal(models.reparameterize(k, mean, logvar),
                               models.reparameterize(jax.random.key(4), mean, logvar))


@pytest.mark.parametrize("name,latent_dim", [("conv", 32), ("keras", 2)])
def test_subpixel_upsampling_is_exactly_conv_transpose(name, latent_dim):
    """Same parameter tree and initial values, same outputs and gradients."""
    c = configs.get_base_config()
    c.model.name, c.model.latent_dim = name, latent_dim
    c.model.upsample = "conv_transpose"
    reference = models.build_model(c.model)
    c.model.upsample = "subpixel"
    fast = models.build_model(c.model)
    params = models.init_params(reference, jax.random.key(0))
    assert shapes(params) == shapes(models.init_params(fast, jax.random.key(0)))
    assert params_equal(params, models.init_params(fast, jax.random.key(0)))
    images = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    key = jax.random.key(2)

    def loss(model, p):
        logits, _, _ = model.apply({"params": p}, images, key)
        return jnp.sum(jnp.sin(logits))  # any non-trivial function of the outputs

    np.testing.assert_allclose(reference.apply({"params": params}, images, key)[0],
                               fast.apply({"params": params}, images, key)[0],
                               rtol=1e-5, atol=1e-5)
    g_ref = jax.grad(lambda p: loss(reference, p))(params)
    g_fast = jax.grad(lambda p: loss(fast, p))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 g_ref, g_fast)


def test_phase_kernel_matches_a_direct_transposed_conv():
    """Against numpy: scatter each input pixel through the 3x3 kernel onto the
    2x-upsampled grid, with lax.conv_transpose's SAME offsets (pad 2 before, 1 after)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 4, 2)).astype(np.float32)
    w = rng.normal(size=(3, 3, 2, 5)).astype(np.float32)
    out = np.zeros((1, 6, 8, 5), np.float32)
    for i in range(3):
        for j in range(4):
            for a in range(3):
                for b in range(3):
                    r, c = 2 * i + 2 - a, 2 * j + 2 - b  # y[r] += w[a] * x[i], r + a - 2 = 2i
                    if 0 <= r < 6 and 0 <= c < 8:
                        out[0, r, c] += x[0, i, j] @ w[a, b]
    y = models.subpixel_conv_transpose(x, w, np.zeros(5, np.float32))
    np.testing.assert_allclose(y, out, rtol=1e-5, atol=1e-5)



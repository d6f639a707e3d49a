"""fvae's CPU kernels for 3x3 convolutions and stride-2 transposed convolutions: the
convolution and both gradients equal XLA's (nn.ConvTranspose's), with every candidate
register-tile set, whatever the channels, batch, vmapping or number of threads. Each
test forces one tile set (FVAE_KERNEL_TILES), so that the kernels, not the measured
dispatch's choice (tests/test_cpu_dispatch.py), are what is checked."""

import logging
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_params_close, params_equal
from fvae import configs, cpu, models, train
from fvae.cpu import kernels as cpu_kernels

NHWC = cpu_kernels.NHWC
HOST_TILES = cpu_kernels.candidates()[0]
# Every instruction set's candidates, which any x86-64 or Arm host compiles (as plain
# SIMD where it lacks the instruction set): a tile size that miscounts a remainder shows
# up on any host.
EVERY_TILE_SET = sorted({t for sets in cpu_kernels.CANDIDATES.values() for t in sets})


@pytest.fixture(autouse=True)
def host_tiles(monkeypatch):
    """The host's first candidate for every layer, unmeasured."""
    monkeypatch.setenv(cpu_kernels.TILES_VARIABLE, HOST_TILES)


@pytest.fixture(params=EVERY_TILE_SET)
def tiles(request, monkeypatch):
    """Each candidate tile set in turn, forced for every layer."""
    monkeypatch.setenv(cpu_kernels.TILES_VARIABLE, request.param)
    assert cpu_kernels.load() == (request.param,)
    return request.param


def xla_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)


def xla_conv_bias_relu(x, kernel, bias, residual=None):
    """relu(residual + conv(x) + bias), as XLA computes it."""
    y = xla_conv(x, kernel) + bias
    return jax.nn.relu(y if residual is None else y + residual)


def value_and_grads(fn, *args, dy):
    """fn(*args), and the gradients of <fn(*args), dy> for every argument."""
    every = tuple(range(len(args)))
    return jax.jit(lambda *args: (fn(*args), *jax.grad(
        lambda *args: jnp.vdot(fn(*args), dy), every)(*args)))(*args)


def random(shape, seed, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


@pytest.mark.parametrize("batch,size,c_in,c_out", [
    (16, 28, 32, 32),  # the study's residual blocks
    (8, 7, 64, 128),  # the encoder's last conv
    (8, 28, 32, 1),  # the decoder's output: one logit...
    (8, 28, 32, 2),  # ...or two channels with a per-pixel scale
    (7, 5, 3, 16),  # in-channels that no tile fits; a batch that 8 does not divide
    (13, 9, 48, 8),  # a prime batch: groups of one image
])
def test_convolution_and_gradients_equal_xla(batch, size, c_in, c_out, tiles):
    x, kernel = random((batch, size, size, c_in), 0), random((3, 3, c_in, c_out), 1, 0.1)
    dy = random((batch, size, size, c_out), 2)
    assert cpu_kernels.covers(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)
    assert f"fvae_conv3x3_weight_grad_{tiles.replace(',', '_')}" in str(jax.make_jaxpr(
        lambda *args: value_and_grads(cpu_kernels.conv3x3, *args, dy=dy))(x, kernel))
    for ours, reference in zip(value_and_grads(cpu_kernels.conv3x3, x, kernel, dy=dy),
                               value_and_grads(xla_conv, x, kernel, dy=dy)):
        np.testing.assert_allclose(ours, reference, rtol=1e-4,
                                   atol=1e-5 * float(jnp.abs(reference).max()))


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("batch,size,c_in,c_out", [(8, 28, 32, 32), (5, 7, 16, 48)])
def test_fused_bias_residual_relu_and_gradients_equal_xla(batch, size, c_in, c_out,
                                                          with_residual, tiles):
    """relu(residual + (conv + bias)) in one kernel pass: the residual block's convs."""
    x, kernel = random((batch, size, size, c_in), 0), random((3, 3, c_in, c_out), 1, 0.1)
    bias, residual = random((c_out,), 2), random((batch, size, size, c_out), 3)
    dy = random((batch, size, size, c_out), 4)

    def fused(fn):
        return lambda x, k, b, r: fn(x, k, b, r if with_residual else None)

    ours = value_and_grads(fused(cpu_kernels.conv3x3_bias_relu), x, kernel, bias, residual,
                           dy=dy)
    target = "fvae_conv3x3_bias_add_relu" if with_residual else "fvae_conv3x3_bias_relu"
    assert target in str(jax.make_jaxpr(fused(cpu_kernels.conv3x3_bias_relu))(
        x, kernel, bias, residual))
    assert float((ours[0] == 0).mean()) > 0.2  # the ReLU clips a good share
    for ours_part, reference in zip(ours, value_and_grads(
            fused(xla_conv_bias_relu), x, kernel, bias, residual, dy=dy)):
        np.testing.assert_allclose(ours_part, reference, rtol=1e-4,
                                   atol=1e-5 * float(jnp.abs(reference).max()) + 1e-30)


def test_fused_relu_keeps_nans():
    """A NaN must reach the loss (and its non-finite check), not become a ReLU's 0: the
    fused output is NaN exactly where the convolution is, as with jnp.maximum (XLA:CPU's
    own fused ReLU after a transposed conv was seen to drop them)."""
    x, kernel = random((2, 7, 7, 16), 0).at[0, 3, 3, 5].set(jnp.nan), random((3, 3, 16, 16), 1)
    bias = random((16,), 2)
    conv = xla_conv(x, kernel)
    assert int(jnp.isnan(conv).sum()) == 9 * 16  # the 3x3 neighbourhood, every channel
    np.testing.assert_array_equal(jnp.isnan(cpu_kernels.conv3x3_bias_relu(x, kernel, bias)),
                                  jnp.isnan(conv))
    transposed = flax_conv_transpose(x, kernel)
    assert int(jnp.isnan(transposed).sum()) == 9 * 16
    np.testing.assert_array_equal(
        jnp.isnan(cpu_kernels.conv_transpose(x, kernel, bias, True)), jnp.isnan(transposed))


def flax_conv_transpose(x, kernel, bias=None, relu=False):
    """nn.ConvTranspose's (3, 3), stride-2, 'SAME' layer, then a ReLU if `relu`."""
    layer = nn.ConvTranspose(kernel.shape[-1], (3, 3), strides=(2, 2), padding="SAME",
                             use_bias=bias is not None)
    y = layer.apply({"params": {"kernel": kernel} | ({} if bias is None else {"bias": bias})}, x)
    return nn.relu(y) if relu else y


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("batch,size,c_in,c_out", [
    (8, 7, 128, 64),  # the study's first upsampling layer...
    (8, 14, 64, 32),  # ...and its second
    (13, 5, 16, 48),  # a prime batch; three output tiles of 16
    (3, 1, 32, 16),  # one pixel: only the taps inside the output
])
def test_transposed_convolution_and_gradients_equal_flax(batch, size, c_in, c_out, relu,
                                                         tiles):
    x, kernel = random((batch, size, size, c_in), 0), random((3, 3, c_in, c_out), 1, 0.1)
    bias, dy = random((c_out,), 2), random((batch, 2 * size, 2 * size, c_out), 3)
    ours = lambda x, k, b: cpu_kernels.conv_transpose(x, k, b, relu)
    jaxpr = str(jax.make_jaxpr(lambda *args: value_and_grads(ours, *args, dy=dy))(
        x, kernel, bias))
    assert "fvae_conv_transpose3x3s2_weight_grad" in jaxpr
    assert ("fvae_conv_transpose3x3s2_bias_relu" in jaxpr) == relu
    for ours_part, reference in zip(
            value_and_grads(ours, x, kernel, bias, dy=dy),
            value_and_grads(lambda *args: flax_conv_transpose(*args, relu), x, kernel, bias,
                            dy=dy)):
        np.testing.assert_allclose(ours_part, reference, rtol=1e-4,
                                   atol=1e-5 * float(jnp.abs(reference).max()))


def test_transposed_convolutions_the_kernels_do_not_cover_are_left_to_xla():
    x, kernel, bias = random((2, 7, 7, 16), 0), random((3, 3, 16, 8), 1), random((8,), 2)
    assert "fvae" not in str(jax.make_jaxpr(cpu_kernels.conv_transpose)(x, kernel, bias))
    np.testing.assert_allclose(cpu_kernels.conv_transpose(x, kernel, bias, True),
                               flax_conv_transpose(x, kernel, bias, True), rtol=1e-5, atol=1e-5)
    bf16 = [a.astype(jnp.bfloat16) for a in (x, kernel.repeat(2, -1), bias.repeat(2))]
    assert "fvae" not in str(jax.make_jaxpr(cpu_kernels.conv_transpose)(*bf16))


@pytest.mark.parametrize("conv,reference", [(cpu_kernels.conv3x3, xla_conv),
                                            (cpu_kernels.conv_transpose3x3s2,
                                             flax_conv_transpose)])
def test_vmapped_over_seeds_equals_each_seed(conv, reference):
    xs, kernels = random((2, 8, 7, 7, 16), 0), random((2, 3, 3, 16, 32), 1, 0.1)
    dys = random((2, *jax.eval_shape(reference, xs[0], kernels[0]).shape), 2)
    vmapped = jax.vmap(lambda x, k, dy: value_and_grads(conv, x, k, dy=dy))(xs, kernels, dys)
    for seed in range(2):
        alone = value_and_grads(reference, xs[seed], kernels[seed], dy=dys[seed])
        for ours, expected in zip(vmapped, alone):
            np.testing.assert_allclose(ours[seed], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("conv,dy_size", [(cpu_kernels.conv3x3, 28),
                                           (cpu_kernels.conv_transpose3x3s2, 56)])
def test_results_are_deterministic(conv, dy_size):
    """Threads claim groups of images in any order; each group's sum is one thread's."""
    x, kernel, dy = random((64, 28, 28, 32), 0), random((3, 3, 32, 32), 1), random(
        (64, dy_size, dy_size, 32), 2)
    first, second = (value_and_grads(conv, x, kernel, dy=dy) for _ in range(2))
    assert params_equal(first, second)


@pytest.mark.parametrize("kwargs", [
    {"window_strides": (2, 2)}, {"padding": "VALID"}, {"rhs_dilation": (2, 2)},
    {"dimension_numbers": ("NCHW", "HWIO", "NCHW")}, {"feature_group_count": 2},
    {"precision": jax.lax.Precision.HIGHEST},
])
def test_other_convolutions_are_left_to_xla(kwargs):
    nchw = kwargs.get("dimension_numbers")
    x = random((2, 16, 8, 8) if nchw else (2, 8, 8, 16), 0)
    kernel = random((3, 3, 8 if kwargs.get("feature_group_count") else 16, 16), 1)
    args = {"window_strides": (1, 1), "padding": "SAME", "dimension_numbers": NHWC, **kwargs}
    assert not cpu_kernels.covers(x, kernel, **args)
    np.testing.assert_array_equal(cpu_kernels.conv_general_dilated(x, kernel, **args),
                                  jax.lax.conv_general_dilated(x, kernel, **args))


def test_other_dtypes_and_channel_counts_are_left_to_xla():
    x, kernel = random((2, 8, 8, 16), 0), random((3, 3, 16, 16), 1)
    assert cpu_kernels.covers(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)
    assert not cpu_kernels.covers(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16),
                                  (1, 1), "SAME", dimension_numbers=NHWC)
    assert not cpu_kernels.covers(x[..., :8], kernel[:, :, :8, :8], (1, 1), "SAME",
                                  dimension_numbers=NHWC)  # neither side a multiple of 16


def test_the_model_uses_the_kernels_and_trains_as_with_xla(make_config, tmp_path):
    config = make_config(**{"model.encoder_widths": (8, 16, 16),
                            "model.decoder_widths": (16, 16, 16), "train.num_epochs": 1})
    plain = models.build_model(config.model)
    model = cpu.accelerate(plain, "fvae")
    params = models.init_params(model, jax.random.key(0))
    assert params_equal(params, models.init_params(plain, jax.random.key(0)))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: model.apply(
        {"params": p}, jnp.zeros((8, 28, 28, 1)), jax.random.key(1))[0].sum()))(params))
    # encoder Conv_2, the residual block's two convs and the output conv
    assert jaxpr.count("fvae_conv3x3_weight_grad") == 4
    assert jaxpr.count("fvae_conv_transpose3x3s2_weight_grad") == 2  # the upsampling layers
    assert jaxpr.count("fvae_conv_transpose3x3s2_bias_relu") == 2
    assert jaxpr.count("fvae_conv3x3_bias_relu") == jaxpr.count("fvae_conv3x3_bias_add_relu") == 1
    assert "fvae_" not in str(jax.make_jaxpr(lambda p: plain.apply(
        {"params": p}, jnp.zeros((8, 28, 28, 1)), jax.random.key(1)))(params))

    runs = {}
    for kernels in ("fvae", "xla"):
        config.runtime.cpu_conv3x3 = kernels
        runs[kernels] = train.train_and_evaluate(config, str(tmp_path / kernels)).params
    assert_params_close(runs["fvae"], runs["xla"], rtol=1e-3, atol=1e-4)


class NewModel(nn.Module):
    """A model fvae has never seen, in plain Flax: a 3x3 conv the kernels cover, one
    they do not (8 channels), a strided one and a dense layer."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (3, 3))(x))  # covered: 16 channels, stride 1, SAME
        x = nn.Conv(8, (3, 3))(x)  # 16 -> 8: covered on the input side
        x = nn.Conv(8, (3, 3), strides=2)(x)  # strided: XLA's
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def test_a_new_plain_flax_model_gets_the_fast_path_unchanged():
    """Any nn.Conv the kernels cover is computed by them, from the same parameters, and
    gives XLA's values and gradients; the rest is untouched."""
    plain = NewModel()
    fast = cpu.accelerate(plain, "fvae")
    x = random((4, 12, 12, 1), 0)
    params = fast.init(jax.random.key(0), x)
    assert params_equal(params, plain.init(jax.random.key(0), x))
    loss = lambda model: lambda p: jnp.sum(model.apply(p, x) ** 2)
    assert str(jax.make_jaxpr(jax.grad(loss(fast)))(params)).count("fvae_conv3x3_weight_grad") == 3
    (value, grads), (reference, reference_grads) = (
        jax.jit(jax.value_and_grad(loss(model)))(params) for model in (fast, plain))
    np.testing.assert_allclose(value, reference, rtol=1e-5)
    assert_params_close(grads, reference_grads, rtol=1e-4, atol=1e-6)


def test_xla_choice_returns_the_plain_model_and_a_bad_one_is_refused():
    plain = NewModel()
    assert cpu.accelerate(plain, "xla") is plain
    with pytest.raises(ValueError, match="runtime.cpu_conv3x3"):
        cpu.accelerate(plain, "mkl")
    assert set(configs.CPU_CONV3X3) == {"fvae", "xla"}


def test_without_a_compiler_xla_runs_the_convolutions(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("FVAE_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):  # (_load itself caches its answer; a tile set
        # no test registers, since a process registers each tile set once)
        assert cpu_kernels._load.__wrapped__(("4,3,5,5",)) == ()
    assert "XLA's convolutions are used" in caplog.text and "cpu_conv3x3='xla'" in caplog.text


def test_a_candidate_that_does_not_compile_leaves_the_others(monkeypatch, caplog):
    """A tile set the compiler fails on is dropped with a warning; the others load."""
    compile_for = cpu_kernels.library_path

    def failing_for_one(tiles):
        if tiles == "8,2,5,5":  # (a set no test registers: a process registers each once)
            raise subprocess.CalledProcessError(1, "c++", stderr="internal compiler error")
        return compile_for(tiles)

    monkeypatch.setattr(cpu_kernels, "library_path", failing_for_one)
    with caplog.at_level(logging.WARNING):
        assert cpu_kernels._load.__wrapped__((HOST_TILES, "8,2,5,5")) == (HOST_TILES,)
    assert "tiles 8,2,5,5 could not be compiled" in caplog.text
    assert "the other tile sets are measured" in caplog.text and "internal compiler" in caplog.text


def test_the_compiled_library_is_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("FVAE_CACHE_DIR", str(tmp_path))
    path = cpu_kernels.library_path(HOST_TILES)
    assert path.parent == tmp_path / "kernels" and path.exists()
    monkeypatch.setattr(cpu_kernels.subprocess, "run", None)  # compiling again would fail
    assert cpu_kernels.library_path(HOST_TILES) == path


def test_the_host_measures_its_instruction_sets_candidates(monkeypatch):
    monkeypatch.delenv(cpu_kernels.TILES_VARIABLE)
    assert cpu_kernels.candidates() == cpu_kernels.CANDIDATES[cpu_kernels.instruction_set()]
    assert not cpu_kernels.forced()
    assert cpu_kernels.load() == cpu_kernels.candidates()  # every one compiles here
    monkeypatch.setenv(cpu_kernels.TILES_VARIABLE, "8,4,3,3; 8,2,6,6")
    assert cpu_kernels.candidates() == ("8,4,3,3", "8,2,6,6") and not cpu_kernels.forced()


@pytest.mark.parametrize("value", ["8,4", "8,4,3,3;", "32,1,1,1", ""])
def test_a_malformed_tiles_variable_is_refused(monkeypatch, value):
    monkeypatch.setenv(cpu_kernels.TILES_VARIABLE, value)
    if value == "8,4,3,3;":  # a trailing separator is only that
        assert cpu_kernels.candidates() == ("8,4,3,3",)
        return
    with pytest.raises(ValueError, match=f"FVAE_KERNEL_TILES={value!r}.*'8,4,3,3;8,2,6,6'"):
        cpu_kernels.candidates()

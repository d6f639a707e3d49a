"""The measured dispatch (fvae/cpu/dispatch.py): each layer shape is computed by the
candidate that times fastest on this machine, never by a slower kernel than XLA or by
one that fails or computes something else, and the choice is remembered on disk."""

import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_params_close
from fvae import cpu, models
from fvae.cpu import dispatch
from fvae.cpu import kernels as cpu_kernels

SHAPES = [(8, 14, 14, 16), (3, 3, 16, 16)]


def xla_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=cpu_kernels.NHWC)


def slow_conv(x, kernel):
    """XLA's convolution, 24 times in a chain XLA cannot shorten: the same result
    (1e-30 of it is below x's precision), about 24x the time."""
    return jax.lax.fori_loop(0, 24, lambda i, y: xla_conv(x + 1e-30 * y, kernel),
                             xla_conv(x, kernel))


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    """Each test starts with no choices made in this process."""
    monkeypatch.setattr(dispatch, "_chosen", {})


def test_a_kernel_slower_than_xla_is_not_chosen_and_a_faster_one_is(tmp_path):
    table = tmp_path / "dispatch.json"
    assert dispatch.choose("conv", SHAPES, {"xla": xla_conv, "slow": slow_conv}, table) == "xla"
    record = dispatch.records()["conv 8x14x14x16 3x3x16x16"]
    assert record["ms"]["slow"] > 5 * record["ms"]["xla"]
    assert dispatch.choose("other", SHAPES, {"xla": slow_conv, "fast": xla_conv,
                                             "slower": slow_conv}, table) == "fast"
    assert dispatch.choices() == {"conv 8x14x14x16 3x3x16x16": "xla",
                                  "other 8x14x14x16 3x3x16x16": "fast"}


@pytest.mark.parametrize("broken", ["raises", "wrong", "nan"])
def test_a_failing_or_wrong_kernel_is_dropped_with_a_warning(tmp_path, caplog, broken):
    def kernel(x, k):
        if broken == "raises":
            raise RuntimeError("the kernel crashed")
        y = xla_conv(x, k)
        return y * 1.01 if broken == "wrong" else y.at[0, 0, 0, 0].set(jnp.nan)

    with caplog.at_level(logging.WARNING):
        choice = dispatch.choose("conv", SHAPES, {"xla": slow_conv, "broken": kernel},
                                 tmp_path / "dispatch.json")
    assert choice == "xla"  # though the broken one would be faster
    record = dispatch.records()["conv 8x14x14x16 3x3x16x16"]
    assert "broken" in record["dropped"] and "broken" not in record["ms"]
    reason = {"raises": "the kernel crashed", "wrong": "differs from XLA's",
              "nan": "differs from XLA's"}[broken]
    assert "tiles broken was dropped" in caplog.text and reason in caplog.text


def test_a_choice_is_remembered_on_disk_and_not_measured_again(tmp_path, monkeypatch):
    table = tmp_path / "kernels" / "dispatch.json"
    options = {"xla": slow_conv, "fast": xla_conv}
    assert dispatch.choose("conv", SHAPES, options, table) == "fast"
    written = json.loads(table.read_text())["choices"]["conv 8x14x14x16 3x3x16x16"]
    assert written["choice"] == "fast" and set(written["ms"]) == {"xla", "fast"}

    measure = dispatch.measure
    monkeypatch.setattr(dispatch, "_chosen", {})  # a new process...
    monkeypatch.setattr(dispatch, "measure", None)  # ...that must not measure again
    assert dispatch.choose("conv", SHAPES, options, table) == "fast"
    # a table choice this process cannot make (a tile set it no longer has) is measured
    monkeypatch.setattr(dispatch, "_chosen", {})
    monkeypatch.setattr(dispatch, "measure", measure)
    assert dispatch.choose("conv", SHAPES, {"xla": xla_conv, "slow": slow_conv}, table) \
        == "xla"


def test_the_first_recorded_choice_wins_and_a_damaged_table_is_measured_again(tmp_path):
    table = tmp_path / "dispatch.json"
    first = {"choice": "a", "ms": {"a": 1.0, "xla": 2.0}}
    assert dispatch.write_choice(table, "conv k", first) == first
    assert dispatch.write_choice(table, "conv k", {"choice": "xla"}) == first
    table.write_text("{damaged")
    assert dispatch.read_table(table) == {}
    assert dispatch.choose("conv", SHAPES, {"xla": xla_conv, "slow": slow_conv}, table) \
        == "xla"
    assert "conv 8x14x14x16 3x3x16x16" in dispatch.read_table(table)


def test_measuring_afresh_leaves_the_table_and_the_processes_choices(tmp_path):
    table = tmp_path / "dispatch.json"
    dispatch.write_choice(table, "conv 8x14x14x16 3x3x16x16", {"choice": "slow"})
    with dispatch.measuring_afresh():
        assert dispatch.choose("conv", SHAPES, {"xla": xla_conv, "slow": slow_conv},
                               table) == "xla"
    assert dispatch.choices() == {}
    assert dispatch.read_table(table)["conv 8x14x14x16 3x3x16x16"] == {"choice": "slow"}


def test_measuring_runs_while_a_step_is_traced(tmp_path):
    """choose() is called while jit, vmap and grad trace the step: the timing runs for
    real all the same."""
    def layer(x, k):
        choice = dispatch.choose("conv", [x.shape, k.shape],
                                 {"xla": xla_conv, "slow": slow_conv}, tmp_path / "t.json")
        return xla_conv(x, k) if choice == "xla" else slow_conv(x, k)

    x = jnp.ones((2, *SHAPES[0]))
    k = jnp.ones((2, *SHAPES[1]))
    jax.jit(jax.vmap(jax.grad(lambda x, k: layer(x, k).sum())))(x, k)
    assert dispatch.records()["conv 8x14x14x16 3x3x16x16"]["ms"]["slow"] > 0


# ---------------------------------------------------------------- with fvae's kernels
@pytest.fixture
def measured(monkeypatch, tmp_path):
    """The host's candidates measured, into a table of the test's own."""
    monkeypatch.delenv(cpu_kernels.TILES_VARIABLE, raising=False)
    monkeypatch.setenv("FVAE_CACHE_DIR", str(tmp_path))  # (compiled again: ~10 s)
    return tmp_path


def study_like_model():
    """The study's model, narrower: every kind of layer the kernels cover."""
    from fvae import configs
    config = configs.get_base_config().model
    config.latent_dim = 2
    config.encoder_widths, config.decoder_widths = (8, 16, 32), (32, 16, 16)
    return models.build_model(config)


# The dispatch's ops and the kernels (FFI targets) that compute them.
TARGETS = {"conv3x3": "fvae_conv3x3", "conv3x3_bias_relu": "fvae_conv3x3_bias_relu",
           "conv3x3_bias_add_relu": "fvae_conv3x3_bias_add_relu",
           "conv3x3_weight_grad": "fvae_conv3x3_weight_grad",
           "conv_transpose_bias_relu": "fvae_conv_transpose3x3s2_bias_relu",
           "conv_transpose_input_grad": "fvae_conv_transpose3x3s2_input_grad",
           "conv_transpose_weight_grad": "fvae_conv_transpose3x3s2_weight_grad"}


def gradient_jaxpr_and_values(model, params, x):
    loss = lambda p: model.apply({"params": p}, x, jax.random.key(1))[0].sum()  # noqa
    return str(jax.make_jaxpr(jax.grad(loss))(params)), jax.jit(jax.grad(loss))(params)


def test_the_model_computes_each_layer_as_measured(measured):
    """Every layer the kernels cover is measured; where a tile set won, its kernel is in
    the step, where XLA won, no kernel is; the gradients are XLA's either way."""
    plain = study_like_model()
    model = cpu.accelerate(plain, "fvae")
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(8, 28, 28, 1)), jnp.float32)
    params = models.init_params(model, jax.random.key(0))
    jaxpr, grads = gradient_jaxpr_and_values(model, params, x)
    choices = cpu.kernel_choices()
    ops = {name.split()[0] for name in choices}
    assert ops == {"conv3x3", "conv3x3_bias_relu", "conv3x3_bias_add_relu",
                   "conv3x3_weight_grad", "conv_transpose_bias_relu",
                   "conv_transpose_input_grad", "conv_transpose_weight_grad"}
    assert set(choices.values()) <= {*cpu_kernels.candidates(), "xla"}
    table = dispatch.read_table(cpu_kernels.table_path())
    assert {name: record["choice"] for name, record in table.items()} == choices
    for op, target in TARGETS.items():  # each op's kernels are in the step, and only they
        chosen = {c.replace(",", "_") for name, c in choices.items()
                  if name.split()[0] == op and c != "xla"}
        assert set(re.findall(rf"{target}_(\d+_\d+_\d+_\d+)\b", jaxpr)) == chosen, op
    _, reference = gradient_jaxpr_and_values(plain, params, x)
    assert_params_close(grads, reference, rtol=1e-3, atol=1e-5)


def test_where_xla_wins_every_layer_the_step_is_xlas(measured, monkeypatch):
    """A machine on which every kernel loses: the dispatch picks XLA for each layer and
    the step has no kernel in it."""
    monkeypatch.setattr(dispatch, "XLA_MARGIN", 1e9)  # XLA wins every layer here
    plain = study_like_model()
    model = cpu.accelerate(plain, "fvae")
    params = models.init_params(model, jax.random.key(0))
    jaxpr, _ = gradient_jaxpr_and_values(model, params, jnp.zeros((8, 28, 28, 1)))
    assert cpu.kernel_choices() and set(cpu.kernel_choices().values()) == {"xla"}
    assert "fvae_" not in jaxpr


def test_a_run_records_which_implementation_computed_each_layer(measured, make_config):
    from fvae import provenance, train
    config = make_config(**{"model.encoder_widths": (8, 16, 16),
                            "model.decoder_widths": (16, 16, 16), "train.num_epochs": 1})
    workdir = measured / "run"
    train.train_and_evaluate(config, str(workdir))
    [session] = provenance.read(workdir)
    assert session["machine"]["kernel_candidates"] == list(cpu_kernels.candidates())
    recorded = session["kernel_choices"]
    assert recorded == cpu.kernel_choices() and len(recorded) >= 8
    assert any(name.startswith("conv_transpose_weight_grad ") for name in recorded)


@pytest.mark.parametrize("xla_ops", [
    {"conv3x3_bias_relu", "conv3x3_bias_add_relu", "conv_transpose_bias_relu"},  # layers
    {"conv3x3_weight_grad", "conv_transpose_input_grad", "conv_transpose_weight_grad"},
])
def test_any_mix_of_choices_gives_xlas_gradients(measured, monkeypatch, xla_ops):
    """XLA for some ops and a kernel for the others (here forced, as some machine may
    measure): a layer's forward pass by XLA with its gradients by kernels, or the
    reverse, gives the plain model's values and gradients."""
    tiles = cpu_kernels.candidates()[0]
    monkeypatch.setattr(cpu_kernels, "_choose",
                        lambda op, *args: "xla" if op in xla_ops else tiles)
    plain = study_like_model()
    model = cpu.accelerate(plain, "fvae")
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(8, 28, 28, 1)), jnp.float32)
    params = models.init_params(model, jax.random.key(0))
    jaxpr, grads = gradient_jaxpr_and_values(model, params, x)
    for op, target in TARGETS.items():
        assert (f"{target}_{tiles.replace(',', '_')}" in jaxpr) == (op not in xla_ops), op
    _, reference = gradient_jaxpr_and_values(plain, params, x)
    assert_params_close(grads, reference, rtol=1e-3, atol=1e-5)


def test_a_resumed_run_computes_as_its_provenance_records(measured, make_config,
                                                          monkeypatch):
    """With the table of choices gone (a cleared cache, changed code), a resumed run
    takes each layer's choice from its own provenance, measuring nothing."""
    from fvae import provenance, train
    config = make_config(**{"model.encoder_widths": (8, 16, 16),
                            "model.decoder_widths": (16, 16, 16), "train.num_epochs": 1})
    workdir = measured / "run"
    train.train_and_evaluate(config, str(workdir))
    first = provenance.read(workdir)[0]["kernel_choices"]
    for table in (measured / "kernels").glob("dispatch-*.json"):
        table.unlink()
    monkeypatch.setattr(dispatch, "_chosen", {})  # a new process
    monkeypatch.setattr(dispatch, "measure", None)  # that must not measure
    config.train.num_epochs = 2
    train.train_and_evaluate(config, str(workdir))
    resumed = provenance.read(workdir)[-1]
    assert resumed["start_step"] > 0 and resumed["kernel_choices"] == first


def test_another_instruction_sets_candidates_are_measured_as_on_that_machine(measured,
                                                                             monkeypatch):
    """What an AVX2 (or NEON, SSE) machine does, forced here: its own candidates are
    compiled and timed against XLA, and one of them (or XLA) is chosen."""
    avx2 = cpu_kernels.CANDIDATES["avx2"]
    monkeypatch.setenv(cpu_kernels.TILES_VARIABLE, ";".join(avx2))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 14, 14, 32)), jnp.float32)
    kernel = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 32, 32)), jnp.float32)
    np.testing.assert_allclose(jax.jit(cpu_kernels.conv3x3)(x, kernel), xla_conv(x, kernel),
                               rtol=1e-4, atol=1e-4)
    [record] = dispatch.records().values()
    assert set(record["ms"]) == {*avx2, "xla"} and record["choice"] in record["ms"]

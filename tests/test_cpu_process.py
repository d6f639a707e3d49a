"""fvae.cpu.process, start-up: XLA:CPU's convolution kernels and the number of CPU devices."""

import os
import subprocess
import sys

import jaxlib
import pytest

from fvae import configs, runtime
from fvae.cpu import process

MEASURED = jaxlib.version.__version__.startswith(process.EIGEN_CONVOLUTIONS_JAXLIB)

# Compiles one convolution after the start-up step and prints its optimised HLO.
SCRIPT = """
import sys
from fvae.cpu import process
print(process.configure_cpu_convolutions(sys.argv[1]))
import jax, jax.numpy as jnp
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
print(conv.lower(jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text())
"""


def compiled_conv(choice: str, xla_flags: str | None = None) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    result = subprocess.run([sys.executable, "-c", SCRIPT, choice], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    applied, hlo = result.stdout.split("\n", 1)
    return applied, hlo


def entry(hlo: str) -> str:
    return hlo[hlo.index("ENTRY"):]


@pytest.mark.skipif(not MEASURED, reason="the flag is only set on the jaxlib it was measured on")
def test_eigen_takes_convolutions_away_from_ynnpack():
    applied, hlo = compiled_conv("eigen")
    assert applied == "True"
    assert "convolution(" in entry(hlo) and "__ynn_fusion" not in hlo
    applied, hlo = compiled_conv("xla_default")  # jaxlib 0.10's own choice: YNNPACK
    assert applied == "False"
    assert "__ynn_fusion" in entry(hlo) and "convolution(" not in entry(hlo)


def test_xla_flags_of_the_user_win():
    applied, hlo = compiled_conv("eigen", f"{process.YNN_FUSION_FLAG}=")
    assert applied == "False"
    assert "convolution(" in entry(hlo)  # the user's empty list: no YNNPACK at all


def test_the_test_process_uses_the_default_kernels():
    """conftest applies the default before JAX starts, as launch.py does (tests compare
    in-process runs with launch.py subprocesses bit for bit)."""
    assert configs.get_base_config().runtime.cpu_convolutions == "eigen"
    if MEASURED:  # added by conftest, or the user's own choice of the flag
        assert process.YNN_FUSION_FLAG in os.environ.get("XLA_FLAGS", "")


def test_after_jax_started_it_warns_and_changes_nothing(monkeypatch, caplog):
    monkeypatch.setattr(runtime, "backends_started", lambda: True)
    monkeypatch.setattr(process, "EIGEN_CONVOLUTIONS_JAXLIB", (jaxlib.version.__version__,))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert not process.configure_cpu_convolutions("eigen")
    assert "XLA_FLAGS" not in os.environ
    assert "fvae.cpu.setup first" in caplog.text


def test_other_jaxlib_versions_keep_xla_defaults(monkeypatch):
    monkeypatch.setattr(process, "EIGEN_CONVOLUTIONS_JAXLIB", ("0.0.",))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert not process.configure_cpu_convolutions("eigen")
    assert "XLA_FLAGS" not in os.environ


def test_bad_choice_is_a_config_error():
    config = configs.get_base_config()
    config.runtime.cpu_convolutions = "mkl"
    with pytest.raises(ValueError, match="runtime.cpu_convolutions"):
        configs.validate(config)


@pytest.mark.parametrize("cores,batches,expected", [
    (2, (128, 1000), 2), (4, (128, 1000), 4), (12, (128, 1000), 8), (12, (96, 96), 12),
    (6, (128, 1000), 4), (64, (128, 1000), 8), (1, (128,), 1), (2, (33,), 1)])
def test_cpu_devices_0_means_one_per_core_that_divides_the_batches(monkeypatch, cores,
                                                                    batches, expected):
    monkeypatch.setattr(process.os, "cpu_count", lambda: cores)
    assert process.cpu_device_count(0, batches) == expected
    assert process.cpu_device_count(3, batches) == 3  # an explicit request is kept


@pytest.fixture
def huge_pages_would_help(monkeypatch):
    """A Linux machine where the restart helps: glibc 2.36, THP in 'madvise' mode."""
    monkeypatch.setattr(process, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(process, "transparent_huge_pages_mode", lambda: "madvise")
    monkeypatch.delenv(process.RESTARTED, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")


def test_huge_pages_restart_adds_the_tunable_to_the_users(huge_pages_would_help):
    env = process.huge_pages_restart_env(configs.get_base_config().runtime)
    assert env["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0:" + process.HUGE_PAGES_TUNABLE
    assert env[process.RESTARTED] == "1" and env["PATH"] == os.environ["PATH"]
    assert process.with_huge_pages(env, False)["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0"
    assert "GLIBC_TUNABLES" not in process.with_huge_pages(
        {"GLIBC_TUNABLES": process.HUGE_PAGES_TUNABLE}, False)


@pytest.mark.parametrize("case", ["config off", "restarted", "asked already", "old glibc",
                                  "not glibc", "thp always", "thp never"])
def test_no_restart_where_it_cannot_help(huge_pages_would_help, monkeypatch, case):
    config = configs.get_base_config()
    if case == "config off":
        config.runtime.huge_pages = False
    elif case == "restarted":
        monkeypatch.setenv(process.RESTARTED, "1")
    elif case == "asked already":
        monkeypatch.setenv("GLIBC_TUNABLES", process.HUGE_PAGES_TUNABLE)
    elif case in ("old glibc", "not glibc"):
        monkeypatch.setattr(process, "glibc_version", lambda: (2, 31) if case == "old glibc"
                            else ())
    else:
        monkeypatch.setattr(process, "transparent_huge_pages_mode", lambda: case[4:])
    assert process.huge_pages_restart_env(config.runtime) is None
    monkeypatch.setattr(process.os, "execve", lambda *a: pytest.fail("restarted"))
    process.restart_with_huge_pages(config.runtime)


def test_restart_runs_the_same_command_again(huge_pages_would_help, monkeypatch):
    calls = []
    monkeypatch.setattr(process.os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(process.sys, "orig_argv", ["python3", "launch.py", "--config", "x"])
    process.restart_with_huge_pages(configs.get_base_config().runtime)
    (path, argv, env), = calls
    assert path == sys.executable and argv == [sys.executable, "launch.py", "--config", "x"]
    assert process.HUGE_PAGES_TUNABLE in env["GLIBC_TUNABLES"]


def test_machine_readings_parse():
    assert process.transparent_huge_pages_mode() in ("always", "madvise", "never")
    assert process.glibc_version() == () or len(process.glibc_version()) == 2

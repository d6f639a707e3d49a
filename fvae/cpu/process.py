"""The CPU side of process start-up, before any JAX computation: the number of CPU
devices, XLA:CPU's convolution kernels and huge pages for the host allocator. Every
entry point calls `restart_with_huge_pages` and then `setup` (through fvae.cpu).

CPU convolutions (`runtime.cpu_convolutions`): jaxlib 0.10 hands convolutions to
YNNPACK, which runs this model's 32- and 64-channel convolutions on one core. With
'eigen' fvae asks XLA to keep YNNPACK for dots and elementwise fusions only, so the
convolutions run on XLA's own multi-threaded (Eigen) kernels: on a 2-core CPU the
study's model trains about 1.6x faster on one device (fvae.bench, README
"Performance"). The flag is experimental in XLA, so it is set only on the jaxlib
versions it was measured on and only if XLA_FLAGS does not choose already.

Huge pages (`runtime.huge_pages`, Linux with glibc 2.35+ and transparent huge pages in
'madvise' mode): XLA:CPU allocates every step's activations afresh, and with 4 KiB
pages each step page-faults about 46,000 times (the study's model, batch 128). With
glibc's malloc asking for transparent huge pages that is a few hundred, and training
is about 1.3x faster in less memory (fvae.bench). glibc reads the setting only at
start-up, so `restart_with_huge_pages` restarts the entry point once (os.execve: same
process id, arguments and environment plus GLIBC_TUNABLES) before anything else runs.
"""

from __future__ import annotations

import logging
import math
import os
import sys

import jax

from fvae import runtime

# YNNPACK for dots, elementwise and reduction fusions; convolutions left to XLA (Eigen).
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
EIGEN_CONVOLUTIONS_FLAGS = (f"{YNN_FUSION_FLAG}=LIBRARY_FUSION_TYPE_ELTWISE,"
                            "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
EIGEN_CONVOLUTIONS_JAXLIB = ("0.10.",)  # versions where the flag exists and was measured

# glibc's malloc asks the kernel for transparent huge pages for what it maps (glibc 2.35+).
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
RESTARTED = "FVAE_RESTARTED_FOR_HUGE_PAGES"  # set in the restarted process: never twice


def setup(runtime_config, batch_sizes: tuple[int, ...] = ()) -> None:
    """Multi-host start-up, the CPU convolution kernels and the number of CPU devices
    (one per core the batch sizes divide, if runtime.cpu_devices is 0); after
    restart_with_huge_pages, before any JAX computation."""
    if os.environ.get(RESTARTED):
        logging.info("restarted with GLIBC_TUNABLES=%s (runtime.huge_pages)",
                     os.environ.get("GLIBC_TUNABLES"))
    runtime.initialize_distributed()
    configure_cpu_convolutions(runtime_config.cpu_convolutions)
    configure_cpu_devices(runtime_config.cpu_devices, batch_sizes)


def configure_cpu_convolutions(choice: str) -> bool:
    """For choice 'eigen', adds EIGEN_CONVOLUTIONS_FLAGS to XLA_FLAGS (see the module
    doc); 'xla_default' leaves XLA's choice. Returns whether the flags were added."""
    if choice != "eigen":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if YNN_FUSION_FLAG in flags:
        logging.info("XLA_FLAGS sets %s already; keeping it", YNN_FUSION_FLAG)
        return False
    import jaxlib
    version = jaxlib.version.__version__
    if not version.startswith(EIGEN_CONVOLUTIONS_JAXLIB):
        logging.info("runtime.cpu_convolutions='eigen' is only applied on jaxlib %s (this "
                     "is %s); XLA's default convolutions are used", EIGEN_CONVOLUTIONS_JAXLIB,
                     version)
        return False
    if runtime.backends_started():
        logging.warning("JAX started before runtime.cpu_convolutions could be applied; "
                        "call fvae.cpu.setup first (or set XLA_FLAGS='%s')",
                        EIGEN_CONVOLUTIONS_FLAGS)
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {EIGEN_CONVOLUTIONS_FLAGS}".strip()
    return True


def transparent_huge_pages_mode() -> str:
    """The kernel's THP mode ('always', 'madvise' or 'never'); 'never' off Linux."""
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "never"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else "never"


def glibc_version() -> tuple[int, ...]:
    """(major, minor) of the C library if it is glibc, else ()."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):  # no confstr (Windows) or not glibc
        return ()
    return tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else ()


def with_huge_pages(env: dict[str, str], wanted: bool = True) -> dict[str, str]:
    """A copy of environment `env` whose GLIBC_TUNABLES asks for huge pages, or not."""
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":")
                if t and t != HUGE_PAGES_TUNABLE] + ([HUGE_PAGES_TUNABLE] if wanted else [])
    env = {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"}
    return {**env, "GLIBC_TUNABLES": ":".join(tunables)} if tunables else env


def huge_pages_restart_env(runtime_config) -> dict[str, str] | None:
    """The environment to restart with for runtime.huge_pages, or None where a restart
    would not help: asked for already (or done), not glibc 2.35+, or a THP mode of
    'always' (huge pages already) or 'never'."""
    env = dict(os.environ)
    if (not runtime_config.huge_pages or env.get(RESTARTED)
            or HUGE_PAGES_TUNABLE in env.get("GLIBC_TUNABLES", "").split(":")
            or glibc_version() < (2, 35) or transparent_huge_pages_mode() != "madvise"):
        return None
    return {**with_huge_pages(env), RESTARTED: "1"}


def restart_with_huge_pages(runtime_config) -> None:
    """Restarts this entry point with glibc asking for transparent huge pages (see the
    module doc), if that would help; call it first, before JAX starts."""
    env = huge_pages_restart_env(runtime_config)
    if env is None:
        return
    logging.info("restarting with GLIBC_TUNABLES=%s for huge pages (runtime.huge_pages)",
                 env["GLIBC_TUNABLES"])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def cpu_device_count(requested: int, batch_sizes: tuple[int, ...] = ()) -> int:
    """CPU devices to ask XLA for: `requested`, or, when it is 0, the most devices up to
    one per core that every batch size divides evenly.

    With Eigen convolutions one device already uses every core, and on 2 cores it was
    as fast as two (the default is 1); with YNNPACK's one-core convolutions several
    devices are what use the other cores (fvae.bench, 2 cores: about 1.35x)."""
    if requested:
        return requested
    divisor = math.gcd(*batch_sizes) if batch_sizes else 1
    most = max(1, os.cpu_count() or 1)
    return max(d for d in range(1, most + 1) if divisor % d == 0)


def configure_cpu_devices(requested: int, batch_sizes: tuple[int, ...] = ()) -> None:
    """Asks for `cpu_device_count(...)` CPU devices; must run before JAX starts."""
    try:
        jax.config.update("jax_num_cpu_devices", cpu_device_count(requested, batch_sizes))
    except RuntimeError as e:  # backends already started (e.g. inside a notebook)
        logging.warning("could not set the number of CPU devices (%s); using %d", e,
                        jax.local_device_count())

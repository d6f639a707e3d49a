"""Where a number came from: the code, the libraries, the machine and the command.

`record(config)` is one JSON-able dict. Training appends one to workdir/provenance.json
each time it starts or resumes (a resumed run may run other code), eval.json and the
benchmark's JSON carry one, and fvae.compare warns when the runs it compares differ in
code or library versions (`differences`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any

from fvae import configs

FILE = "provenance.json"
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_collections")
SOURCE_DIR = pathlib.Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(SOURCE_DIR), *args], capture_output=True,
                                text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def code() -> dict[str, Any]:
    """The git commit of the fvae source and whether its tree had changes; where it is
    not a git checkout (an installed fvae), the installed version."""
    top = _git("rev-parse", "--show-toplevel")  # fvae's own checkout, not one it sits in
    commit = _git("rev-parse", "HEAD") if top and pathlib.Path(top).resolve() == SOURCE_DIR \
        else None
    if commit is not None:
        changes = _git("status", "--porcelain", "--untracked-files=no")
        return {"commit": commit, "dirty": bool(changes), "source": str(SOURCE_DIR)}
    try:
        version = importlib.metadata.version("fvae")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"commit": None, "dirty": None, "version": version, "source": str(SOURCE_DIR)}


def versions() -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine(config=None) -> dict[str, Any]:
    """Devices (kind, count), the CPU, XLA_FLAGS and, where fvae's CPU kernels may run,
    their candidate tile sets; with a config, its runtime settings. (Which computed
    each layer is known once the step is traced: see `add_to_latest`.)"""
    import jax  # here: reading and comparing records needs no JAX

    from fvae import cpu
    devices = jax.devices()
    record = {"backend": jax.default_backend(), "device_kind": devices[0].device_kind,
              "device_count": len(devices), "local_device_count": jax.local_device_count(),
              "process_count": jax.process_count(), "cpu": cpu.cpu_description(),
              "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if config is not None:
        record["runtime"] = configs.flatten(config.runtime)
        if record["backend"] == "cpu" and config.runtime.cpu_conv3x3 == "fvae":
            record["kernel_candidates"] = list(cpu.candidates())
    return record


def record(config=None) -> dict[str, Any]:
    """Everything above, the command line and the time, as one dict."""
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": list(sys.orig_argv),
            "code": code(), "versions": versions(), "machine": machine(config)}


def append(workdir: str | os.PathLike, entry: dict[str, Any]) -> None:
    """Adds `entry` to workdir/provenance.json ({"sessions": [...]}, oldest first)."""
    _write(workdir, read(workdir) + [entry])


def add_to_latest(workdir: str | os.PathLike, fields: dict[str, Any]) -> None:
    """Sets `fields` in the latest session of workdir/provenance.json (rewriting it only
    if they change it): what becomes known after the session starts, such as the CPU
    kernels' measured choices."""
    sessions = read(workdir)
    if sessions and any(sessions[-1].get(k) != v for k, v in fields.items()):
        sessions[-1].update(fields)
        _write(workdir, sessions)


def _write(workdir: str | os.PathLike, sessions: list[dict[str, Any]]) -> None:
    path = pathlib.Path(workdir) / FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"sessions": sessions}, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def read(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The sessions of workdir/provenance.json, [] where there is none (or it is not
    readable: it never stops a run)."""
    try:
        return list(json.loads((pathlib.Path(workdir) / FILE).read_text())["sessions"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def differences(entries: dict[str, dict[str, Any]]) -> list[str]:
    """What differs in code or library versions among {run name: record}, as sentences."""
    found = []
    for what, get in (("code commit", lambda e: (e.get("code") or {}).get("commit")),
                      ("dirty tree (uncommitted changes)", lambda e: (e.get("code") or {}).get("dirty")),
                      *((f"{name} version", lambda e, n=name: (e.get("versions") or {}).get(n))
                        for name in ("python", *LIBRARIES))):
        values = {name: get(entry) for name, entry in entries.items()}
        if len(set(map(str, values.values()))) > 1:
            found.append(f"{what} differs: " + ", ".join(f"{k}: {v}" for k, v in values.items()))
    return found

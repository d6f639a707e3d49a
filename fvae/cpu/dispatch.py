"""Measured dispatch: which implementation computes a layer on this CPU, chosen by
timing the candidates on the machine itself, once per layer shape, and remembered.

The register tiles of fvae's kernels (fvae/cpu/kernels.py) that win on one CPU lose on
another (the tiles picked by hand on AMD ran at 0.72x Keras on Intel), and on some CPU
XLA's own convolution may beat every tile set. So the first time a layer shape is
traced, `choose` times each candidate (every tile set the host compiles, and XLA) on
random inputs of that shape, checks each candidate's result against XLA's, and picks
the fastest (a near tie goes to the kernel: XLA_MARGIN). A candidate that raises or whose
result differs from XLA's is dropped with a warning. The choice is written to a JSON
table in the kernel cache, keyed by everything the timing depends on (kernels.py names
the file), so a machine measures each shape once and a resumed run computes as before.
FFTW's plans and oneDNN's and XNNPACK's kernel selection work the same way.

The timing runs while the training step is being traced (`jax.ensure_compile_time_eval`
runs it for real), on the same thread pool as training, and costs about half a second
a layer shape (`python -m fvae.bench.kernels` prints each layer's table).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pathlib
import tempfile
import time
from typing import Callable, Iterator, Sequence

import jax
import numpy as np

XLA = "xla"  # the reference candidate: XLA's own computation of the layer
# XLA is chosen only where it takes under this fraction of the fastest kernel's time:
# a near tie goes to the kernel, because XLA's layer, timed alone, is faster than in a
# training step. Timed alone, XLA's residual conv with its bias, skip connection and
# ReLU took 11.6 ms against the kernel's 10.7 (AMD EPYC, batch 128); in the step it
# took 15.3 ms, plus 4.7 for a ReLU XLA did not fuse there and 7.7 to fill a buffer
# of zeros for it (fvae.bench.kernels, and a profile of the step).
XLA_MARGIN = 0.95
ROUNDS = 3  # timed rounds, the candidates interleaved in each; the best round counts
CLOSE_ROUNDS = 4  # more rounds where the fastest kernel and XLA are within CLOSE
CLOSE = 0.1
MIN_SECONDS = 0.003  # calls per timing: enough that one timing lasts at least this
RTOL = 1e-3  # a candidate whose result differs from XLA's by more is dropped

_chosen: dict[str, dict] = {}  # this process's choices, by key
_afresh = False  # measuring_afresh(): ignore and do not write the table on disk
_recorders: list[dict[str, str]] = []  # recording(): the open collectors of choices


def key(op: str, shapes: Sequence[Sequence[int]]) -> str:
    """'conv3x3 128x28x28x32 3x3x32x32': what a choice is remembered by."""
    return " ".join([op, *("x".join(map(str, shape)) for shape in shapes)])


def choose(op: str, shapes: Sequence[Sequence[int]], candidates: dict[str, Callable],
           table: pathlib.Path, timed_shapes: Sequence[Sequence[int]] | None = None) -> str:
    """The name of the candidate that computes `op` on float32 arrays of these shapes
    fastest on this machine: from this process's choices (or those pinned by a resumed
    run), else from `table`, else measured now (see the module doc; on arrays of
    `timed_shapes` if given, e.g. fewer images) and added to `table`. `candidates` maps
    names to functions of the arrays, XLA's among them."""
    name = key(op, shapes)
    known = _chosen.get(name)
    if known is None or known.get("forced") or known["choice"] not in candidates:
        on_disk = {} if _afresh else read_table(table)
        if name in on_disk and on_disk[name].get("choice") in candidates:
            _chosen[name] = on_disk[name]
        else:
            _chosen[name] = measure(timed_shapes or shapes, candidates)
            if not _afresh:
                _chosen[name] = write_choice(table, name, _chosen[name], set(candidates))
    return _seen(name)


def record_forced(op: str, shapes: Sequence[Sequence[int]], choice: str) -> None:
    """Notes a choice made without measuring (FVAE_KERNEL_TILES naming one tile set), so
    that `choices` and `recording` report it too."""
    name = key(op, shapes)
    _chosen[name] = {"choice": choice, "forced": True}
    _seen(name)


def pin(recorded: dict[str, str]) -> None:
    """Makes this process compute each layer of `recorded` ({key: candidate}, as a run's
    provenance has it) as recorded, where that candidate is still to be had: a resumed
    run computes as before even if the table was cleared or the code changed."""
    for name, choice in recorded.items():
        _chosen[name] = {"choice": choice, "pinned": True}


def _seen(name: str) -> str:
    for recorder in _recorders:
        recorder[name] = _chosen[name]["choice"]
    return _chosen[name]["choice"]


@contextlib.contextmanager
def recording() -> Iterator[dict[str, str]]:
    """Yields a dict that collects {key: candidate} for every layer dispatched while it
    is open: what one run computed with, where a process trains several (fvae.sweep)."""
    recorder: dict[str, str] = {}
    _recorders.append(recorder)
    try:
        yield recorder
    finally:
        _recorders.remove(recorder)


def choices() -> dict[str, str]:
    """{layer key: candidate} for every layer shape this process has dispatched."""
    return {name: record["choice"] for name, record in sorted(_chosen.items())}


def records() -> dict[str, dict]:
    """Every choice this process made, with the measured milliseconds of each candidate."""
    return dict(sorted(_chosen.items()))


def afresh() -> bool:
    """Whether `measuring_afresh` is in force."""
    return _afresh


@contextlib.contextmanager
def measuring_afresh() -> Iterator[None]:
    """Measures every layer shape anew, neither reading nor writing the table (for
    fvae.bench.kernels); the process's earlier choices are restored afterwards."""
    global _afresh
    saved, _afresh = dict(_chosen), True
    _chosen.clear()
    try:
        yield
    finally:
        _chosen.clear()
        _chosen.update(saved)
        _afresh = False


def measure(shapes: Sequence[Sequence[int]], candidates: dict[str, Callable]) -> dict:
    """Times every candidate on random inputs of `shapes`; {"choice", "ms", "dropped",
    "seconds"}: XLA's result is the reference each other candidate must match."""
    start = time.perf_counter()
    with jax.ensure_compile_time_eval():  # run for real, even while a step is traced
        rng = np.random.default_rng(0)
        args = [jax.numpy.asarray(rng.normal(size=s).astype(np.float32)) for s in shapes]
        fns = {name: jax.jit(fn) for name, fn in candidates.items()}
        reference = np.asarray(fns[XLA](*args))
        calls, dropped = {}, {}
        for name, fn in fns.items():
            problem = _check(fn, args, reference) if name != XLA else None
            if problem:
                dropped[name] = problem
                logging.warning("fvae's CPU kernel with tiles %s was dropped for %s: %s",
                                name, "x".join(map(str, shapes[0])), problem)
                continue
            once = _seconds(fn, args, 1)
            calls[name] = max(1, math.ceil(MIN_SECONDS / max(once, 1e-6)))
        best = {name: math.inf for name in calls}
        for round_ in range(ROUNDS + CLOSE_ROUNDS):
            if round_ == ROUNDS and not _close(best):
                break
            for name in calls:
                best[name] = min(best[name], _seconds(fns[name], args, calls[name]))
    ms = {name: round(1e3 * s, 4) for name, s in best.items()}
    kernels = [name for name in ms if name != XLA]
    fastest = min(kernels, key=ms.get) if kernels else XLA
    choice = XLA if not kernels or ms[XLA] < XLA_MARGIN * ms[fastest] else fastest
    return {"choice": choice, "ms": ms, "dropped": dropped,
            "seconds": round(time.perf_counter() - start, 3)}


def _close(best: dict[str, float]) -> bool:
    """Whether the fastest kernel's time is within CLOSE of XLA's."""
    kernels = [t for name, t in best.items() if name != XLA]
    return bool(kernels) and abs(min(kernels) - best[XLA]) < CLOSE * best[XLA]


def _check(fn, args, reference: np.ndarray) -> str | None:
    """Why a candidate cannot be used (it raised, or its result is not XLA's), or None."""
    try:
        result = np.asarray(fn(*args))
    except Exception as e:  # noqa: BLE001: any failure of a candidate drops it
        return f"it failed: {type(e).__name__}: {str(e)[:300]}"
    if result.shape != reference.shape:
        return f"its result has shape {result.shape}, XLA's {reference.shape}"
    scale = float(np.abs(reference).max()) or 1.0
    error = float(np.abs(result - reference).max())
    if not np.isfinite(error) or error > RTOL * scale:
        return f"its result differs from XLA's by {error:.3g} (of {scale:.3g})"
    return None


def _seconds(fn, args, calls: int) -> float:
    """Seconds per call of `fn`, over `calls` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


# ---------------------------------------------------------------- the table on disk
def read_table(path: pathlib.Path) -> dict[str, dict]:
    """The choices recorded in `path`; {} if there is none or it is unreadable (it is
    only a cache: a damaged one is measured again)."""
    try:
        table = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in table.get("choices", {}).items() if isinstance(v, dict)} \
        if isinstance(table, dict) else {}


def write_choice(path: pathlib.Path, name: str, record: dict,
                 usable: set[str] | None = None) -> dict:
    """Adds `record` under `name` to the table at `path` (atomically) and returns the
    record now there: another process's, if it measured the same layer first and chose
    a candidate in `usable` (default: any), so that processes sharing a cache compute
    alike. A table that cannot be written is skipped with a warning: the choice then
    lasts this process only."""
    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.with_suffix(".lock")):  # read, add, replace: one process at a time
            table = read_table(path)
            if name in table and (usable is None or table[name].get("choice") in usable):
                return table[name]
            table[name] = record
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False,
                                             suffix=".tmp") as f:
                try:
                    json.dump({"choices": table}, f, indent=1, sort_keys=True)
                    f.flush()
                    os.chmod(f.name, 0o644)  # (a shared cache: others may read it)
                    os.replace(f.name, path)
                except OSError:
                    os.unlink(f.name)
                    raise
    except OSError as e:
        logging.warning("could not record the kernel choice for %s in %s (%s): it will be "
                        "measured again by the next process", name, path, e)
    return record


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
    """An exclusive flock on `path` where the platform has one (else no lock: two
    processes may then both measure a layer, and the table keeps one of the choices)."""
    with open(path, "a") as f:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield

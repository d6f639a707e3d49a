"""The run's metrics log: one JSON object per line in workdir/metrics.jsonl.

Any script can read it (`read_metrics`, `series`). When a run resumes from step s, the
lines written after step s by the interrupted run are dropped, so the log holds each
epoch exactly once. Optionally the same records also go to TensorBoard event files in
workdir/tensorboard/ (`tensorboard --logdir runs/`), with the same resume rule.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import numpy as np

from fvae.images import tile

TENSORBOARD_DIR = "tensorboard"
# Record keys that say where a record belongs rather than what was measured.
BOOKKEEPING_KEYS = ("split", "epoch", "step", "wall_time")


def jsonable(value: Any) -> Any:
    """A value JSON can hold: numpy scalars as Python ones, NaN/inf as strings, nested
    lists and dicts likewise."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible, not silently null
    return value


class TensorBoardWriter:
    """Scalars and image mosaics as TensorBoard event files (tensorboardX, no TensorFlow).

    A fresh run (`resume_step` None) deletes earlier event files, as metrics.jsonl is
    restarted; a resumed run tells TensorBoard to hide events after `resume_step`.
    """

    def __init__(self, logdir: str | os.PathLike, resume_step: int | None = None):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ImportError("TensorBoard logging needs tensorboardX: `pip install "
                              "tensorboardX` (or reinstall fvae), or turn it off.") from e
        self.logdir = pathlib.Path(logdir)
        if resume_step is None and self.logdir.is_dir():
            for old in self.logdir.glob("events.out.tfevents.*"):
                old.unlink()
        purge_step = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(str(self.logdir), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        """Each number in `record` as the scalar f"{split}/{name}" at record["step"]."""
        prefix = f"{record['split']}/" if "split" in record else ""
        for name, value in record.items():
            value = value.item() if hasattr(value, "item") else value
            if name not in BOOKKEEPING_KEYS and isinstance(value, (int, float)):
                self._writer.add_scalar(prefix + name, float(value), record.get("step"))
        self._writer.flush()  # one record per epoch: cheap, and nothing is lost on a kill

    def add_images(self, tag: str, images: np.ndarray, step: int, ncols: int = 8) -> None:
        """Images [N, 28, 28(, 1)] with pixel values in [0, 1], as one tiled mosaic."""
        mosaic = np.clip(tile(np.asarray(images), ncols), 0.0, 1.0)
        self._writer.add_image(tag, mosaic, step, dataformats="HW")
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsWriter:
    """Appends records to metrics.jsonl; `resume_step` drops records past it.

    With `tensorboard=True` every record is also written to workdir/tensorboard/ and
    `add_images` logs image mosaics there; without it `add_images` does nothing.
    With `primary=False` (every process of a multi-host job but process 0) it writes
    nothing at all, so that one process owns the run's files.
    """

    def __init__(self, workdir: str | os.PathLike, resume_step: int | None = None,
                 tensorboard: bool = False, primary: bool = True):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.primary, self.tensorboard = primary, None
        if not primary:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh log
        self.tensorboard = (TensorBoardWriter(self.path.parent / TENSORBOARD_DIR, resume_step)
                            if tensorboard else None)

    def write(self, record: dict[str, Any]) -> None:
        if not self.primary:
            return
        line = json.dumps({k: jsonable(v) for k, v in record.items()})
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def add_images(self, tag: str, images: np.ndarray, step: int, ncols: int = 8) -> None:
        """Logs an image mosaic to TensorBoard (see TensorBoardWriter.add_images)."""
        if self.tensorboard is not None:
            self.tensorboard.add_images(tag, images, step, ncols)

    def close(self) -> None:
        """Closes the TensorBoard file; metrics.jsonl needs no closing."""
        if self.tensorboard is not None:
            self.tensorboard.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl; a torn last line (a killed run) is skipped."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    records = []
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def series(records: list[dict[str, Any]], split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of `key` in the `split` records that have it, as float arrays.

    Values logged as "nan"/"inf" strings come back as floats, so curves show gaps.
    """
    rows = [(r["epoch"], float(r[key])) for r in records
            if r.get("split") == split and key in r and "epoch" in r]
    epochs, values = zip(*rows) if rows else ((), ())
    return np.asarray(epochs, np.float64), np.asarray(values, np.float64)

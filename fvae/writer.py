"""The run's metrics: workdir/metrics.jsonl, and any experiment trackers beside it.

metrics.jsonl (one JSON object per line) is the run's own record: resume, fvae.compare
and fvae.results read it (`read_metrics`, `series`). When a run resumes from step s, the
lines written after step s by the interrupted run are dropped, so the log holds each
epoch exactly once; a fresh start sets an earlier log aside, never deletes it.

Trackers implement MetricWriter, the shape of CLU's (`write_scalars(step, dict)`,
`write_images`, `write_hparams`, `flush`, `close`), and are chosen by name in
config.logging.writers: 'tensorboard' (workdir/tensorboard/, tensorboardX), 'wandb'
and 'mlflow' (extras: pip install "fvae[wandb]", "fvae[mlflow]"; imported only when
named). RunLog writes each record to metrics.jsonl and to every tracker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pathlib
import time
from typing import Any, Mapping

import numpy as np

from fvae import configs
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


def scalars_of(record: Mapping[str, Any]) -> dict[str, float]:
    """A record's numbers as {"<split>/<name>": value} (what trackers are given)."""
    prefix = f"{record['split']}/" if "split" in record else ""
    out = {}
    for name, value in record.items():
        value = value.item() if hasattr(value, "item") else value
        if name not in BOOKKEEPING_KEYS and isinstance(value, (int, float)) \
                and not isinstance(value, bool):
            out[prefix + name] = float(value)
    return out


class MetricWriter:
    """A tracker's interface (as CLU's metric_writers.MetricWriter). Images are
    {tag: [H, W] arrays of pixel values in [0, 1]}; hparams a flat {key: value}."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        raise NotImplementedError

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        raise NotImplementedError

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def write_record(self, record: Mapping[str, Any]) -> None:
        """One metrics.jsonl record: its numbers, as scalars at its step."""
        self.write_scalars(int(record["step"]), scalars_of(record))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()


class JsonLinesWriter(MetricWriter):
    """workdir/metrics.jsonl. `resume_step` keeps the lines up to it; without one (a
    fresh start) an earlier file is renamed metrics.<time>.jsonl, with a warning."""

    def __init__(self, workdir: str | os.PathLike, resume_step: int | None = None):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            set_aside(self.path, "a fresh start")

    def write_record(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({k: jsonable(v) for k, v in record.items()}) + "\n")
            f.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.write_record({"step": step, **scalars})

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        pass  # (the figures are files of their own)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        pass  # (workdir/config.json holds them)


def set_aside(path: pathlib.Path, why: str) -> pathlib.Path:
    """Renames path to <stem>.<time><suffix> beside it and says so: logs are never
    deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
    n = 1
    while target.exists():
        target, n = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}"), n + 1
    path.rename(target)
    logging.warning("%s: the earlier %s was set aside as %s", why, path.name, target)
    return target


class TensorBoardWriter(MetricWriter):
    """TensorBoard event files in logdir (tensorboardX, no TensorFlow). A fresh start
    sets earlier event files aside (logdir.<time>/); a resumed run tells TensorBoard to
    hide events after `resume_step`."""

    def __init__(self, logdir: str | os.PathLike, resume_step: int | None = None):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ImportError("TensorBoard logging needs tensorboardX: `pip install "
                              "tensorboardX` (or reinstall fvae), or take 'tensorboard' "
                              "out of config.logging.writers.") from e
        self.logdir = pathlib.Path(logdir)
        if resume_step is None and any(self.logdir.glob("events.out.tfevents.*")):
            set_aside(self.logdir, "a fresh start")
        purge_step = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(str(self.logdir), purge_step=purge_step)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, step)
        self.flush()  # one record per epoch: cheap, and nothing is lost on a kill

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for tag, image in images.items():
            self._writer.add_image(tag, image, step, dataformats="HW")
        self.flush()

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._writer.add_text("config", "\n".join(f"    {k} = {v!r}"
                                                   for k, v in sorted(hparams.items())))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def run_id(workdir: str | os.PathLike) -> str:
    """A tracker's run id for the workdir: the same on every resume of it."""
    return hashlib.sha256(str(pathlib.Path(workdir).resolve()).encode()).hexdigest()[:16]


class WandbWriter(MetricWriter):
    """Weights & Biases: one wandb run per workdir (resumed with it), files under
    workdir/wandb/; logging.wandb_mode 'offline' writes there only (`wandb sync` later)."""

    def __init__(self, workdir: str | os.PathLike, name: str, project: str, mode: str):
        import wandb
        self._run = wandb.init(project=project, name=name, id=run_id(workdir),
                               resume="allow", dir=str(workdir), mode=mode,
                               settings=wandb.Settings(silent=True))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._run.log(dict(scalars), step=step)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        import wandb
        self._run.log({tag: wandb.Image(image) for tag, image in images.items()}, step=step)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        self._run.config.update(dict(hparams), allow_val_change=True)

    def close(self) -> None:
        self._run.finish()


class MlflowWriter(MetricWriter):
    """MLflow: one MLflow run per workdir (found again by its fvae_run_id tag on resume)
    in experiment `experiment`, tracked at `tracking_uri`; None: $MLFLOW_TRACKING_URI,
    else a local directory, workdir/mlruns, that needs no server or database (MLflow 3
    keeps its file store only on request, MLFLOW_ALLOW_FILE_STORE, which this sets)."""

    def __init__(self, workdir: str | os.PathLike, name: str, experiment: str,
                 tracking_uri: str | None):
        from mlflow.tracking import MlflowClient
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
            (pathlib.Path(workdir).resolve() / "mlruns").as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = MlflowClient(tracking_uri=uri)
        found = self._client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else \
            self._client.create_experiment(experiment)
        tag = run_id(workdir)
        runs = self._client.search_runs([experiment_id], f"tags.fvae_run_id = '{tag}'")
        self._run_id = runs[0].info.run_id if runs else self._client.create_run(
            experiment_id, run_name=name, tags={"fvae_run_id": tag}).info.run_id

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[
            Metric(k.replace("/", "."), v, now, step) for k, v in scalars.items()])

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        for tag, image in images.items():
            self._client.log_image(self._run_id, image, f"{tag}/step{step:08d}.png")

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        from mlflow.entities import Param
        known = self._client.get_run(self._run_id).data.params
        new = [Param(k, str(v)[:500]) for k, v in hparams.items() if k not in known]
        for i in range(0, len(new), 100):  # (MLflow takes 100 params per batch)
            self._client.log_batch(self._run_id, params=new[i:i + 100])

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


def make_writer(name: str, workdir: pathlib.Path, resume_step: int | None,
                logging_config, run_name: str) -> MetricWriter:
    if name == "tensorboard":
        return TensorBoardWriter(workdir / TENSORBOARD_DIR, resume_step)
    if name == "wandb":
        return WandbWriter(workdir, run_name, logging_config.wandb_project,
                           logging_config.wandb_mode)
    if name == "mlflow":
        return MlflowWriter(workdir, run_name, logging_config.mlflow_experiment,
                            logging_config.mlflow_tracking_uri)
    raise ValueError(f"unknown metric writer {name!r}: expected one of "
                     f"{', '.join(configs.WRITERS)}")


class RunLog:
    """A run's metrics: every record to each of its writers (metrics.jsonl first)."""

    def __init__(self, writers: list[MetricWriter]):
        self.writers = writers

    def write(self, record: dict[str, Any]) -> None:
        for writer in self.writers:
            writer.write_record(record)

    def add_images(self, tag: str, images: np.ndarray, step: int, ncols: int = 8) -> None:
        """Images [N, 28, 28(, 1)] with pixel values in [0, 1], as one tiled mosaic."""
        mosaic = np.clip(tile(np.asarray(images), ncols), 0.0, 1.0)
        for writer in self.writers:
            writer.write_images(step, {tag: mosaic})

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_run_log(workdir: str | os.PathLike, config, resume_step: int | None = None,
                 primary: bool = True) -> RunLog:
    """metrics.jsonl and the trackers of config.logging.writers, each given the config
    as hyperparameters. With `primary=False` (every process of a multi-host job but
    process 0) it writes nothing at all, so that one process owns the run's files."""
    if not primary:
        return RunLog([])
    workdir = pathlib.Path(workdir)
    writers: list[MetricWriter] = [JsonLinesWriter(workdir, resume_step)]
    writers += [make_writer(name, workdir, resume_step, config.logging, config.name)
                for name in config.logging.writers]
    hparams = configs.flatten(config)
    for writer in writers:
        writer.write_hparams(hparams)
    return RunLog(writers)


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl. A torn last line (a killed run) is skipped
    quietly; any other line that is not a JSON object is skipped with a warning, and
    the file is first copied to metrics.damaged.jsonl, once, so that nothing is lost."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    records: list[dict[str, Any]] = []
    if not path.exists():
        return records
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif i < len(lines) - 1 or record is not None:  # not a torn last line
            _keep_damaged_copy(path)
            logging.warning("%s line %d is not a JSON object (%r); skipped", path, i + 1,
                            line[:80])
    return records


def _keep_damaged_copy(path: pathlib.Path) -> None:
    copy = path.with_name("metrics.damaged.jsonl")
    if not copy.exists():
        copy.write_bytes(path.read_bytes())
        logging.warning("a copy of %s as it was is kept in %s", path, copy)


def series(records: list[dict[str, Any]], split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of `key` in the `split` records that have it, as float arrays.

    Values logged as "nan"/"inf" strings come back as floats, so curves show gaps.
    """
    rows = [(r["epoch"], float(r[key])) for r in records
            if r.get("split") == split and key in r and "epoch" in r]
    epochs, values = zip(*rows) if rows else ((), ())
    return np.asarray(epochs, np.float64), np.asarray(values, np.float64)

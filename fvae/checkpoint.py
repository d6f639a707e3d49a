"""Orbax checkpoints of trees of arrays: save, resume exactly, read back.

Layout under workdir/checkpoints/:
  latest/<step>/   the last `checkpoint.keep` checkpoints (state + meta)
  best/<step>/     the checkpoint with the lowest validation ELBO so far (its meta
                   records it: `validation_elbo`)
  corrupt/<step>/  checkpoints that failed to load, moved aside (never deleted)

A checkpoint holds the train state as a plain tree of arrays (no pickle), the
running sums of the current epoch's train metrics, and a JSON `meta` item with the
config it was trained with, its format version (`FORMAT_VERSION`) and a CRC-32 of
every array, checked on restore: a checkpoint whose bytes changed on disk is treated
as unreadable (moved to corrupt/, the previous one used), never trained on. Keys and data
order follow from the step (see fvae.keys), so nothing else is needed to continue
bit-for-bit. This module knows nothing about models: a reader passes the tree to
restore into (`read`'s `target_for`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import re
import shutil
import time
import zlib
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from fvae import configs


def _length_sets_a_schedule(flat: dict[str, Any]) -> bool:
    """Whether the run's length shapes its schedules (so extending it changes them)."""
    return flat.get("optim.lr_schedule") != "constant" or (
        flat.get("loss.beta_schedule") == "cyclical" and not flat.get("loss.cycle_steps"))


# The layout of what a checkpoint holds (the tree and its meta). 1 (5ce2280 and before)
# recorded no version; 2: the config has `runtime` and `report` blocks, and a run that
# ends mid-epoch saves its epoch sums unreset; 3: the best checkpoint is chosen on a
# validation split (its meta records `validation_elbo`).
FORMAT_VERSION = 3


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says what to do."""


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json(sort_keys=True))


def config_differences(saved: dict[str, Any], config: ml_collections.ConfigDict,
                       only: tuple[str, ...] | None = None,
                       lengths_resumable: bool = True) -> list[str]:
    """Keys whose values differ in a way that makes resuming meaningless (or, with
    `only`, differing keys among those prefixes); without `lengths_resumable`, a
    different length (train.num_epochs, train.num_steps) counts too: what makes a
    finished run another run."""
    a = configs.flatten(config_to_dict(configs.from_dict(saved)))
    b = configs.flatten(config_to_dict(config))
    keys = sorted(set(a) | set(b))
    if only is not None:
        keys = [k for k in keys if k.startswith(only)]
    else:
        lengths = lengths_resumable and not _length_sets_a_schedule(a)
        keys = [k for k in keys if not configs.is_resumable(k)
                and not (lengths and k in configs.LENGTH_KEYS)]
    return [f"{k}: checkpoint has {a.get(k, '<missing>')!r}, config has {b.get(k, '<missing>')!r}"
            for k in keys if a.get(k) != b.get(k)]


def _manager(directory: pathlib.Path, keep: int | None, async_save: bool):
    # The barriers of a multi-host save are named by step: a prefix per manager keeps
    # 'latest' and 'best' saving the same step apart.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=directory.name))
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


class Checkpointer:
    """Saves and restores one run's checkpoints (latest N and best-by-validation-ELBO)."""

    def __init__(self, workdir: str | pathlib.Path, config: ml_collections.ConfigDict):
        self.root = pathlib.Path(workdir).absolute() / "checkpoints"
        self.config = config
        cc = config.checkpoint
        try:
            self.latest = _manager(self.root / "latest", cc.keep, cc.async_save)
            self.best = _manager(self.root / "best", 1, cc.async_save)
        except OSError as e:
            raise CheckpointError(f"cannot create checkpoints in {self.root}: {e}. Choose a "
                                  "writable --workdir.") from e
        self.best_elbo = float("inf")
        self._pending: dict[Any, int] = {}  # manager: the step its async save is writing

    # ---- saving ----
    def _args(self, tree: dict[str, Any], meta: dict[str, Any]):
        return ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                  meta=ocp.args.JsonSave(meta))

    def _meta(self, step: int, **extra) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "step": step, "config": config_to_dict(self.config),
                "saved_at": time.time(), **extra}

    def save(self, step: int, tree: dict[str, Any]) -> None:
        """Saves `tree` (state and epoch sums) as the latest checkpoint at `step`."""
        self._save(self.latest, step, tree)

    def save_best(self, step: int, tree: dict[str, Any], validation_elbo: float) -> bool:
        """Saves `tree` as the best checkpoint if its validation ELBO is the lowest so far."""
        if not np.isfinite(validation_elbo) or validation_elbo >= self.best_elbo:
            return False
        if not self._save(self.best, step, tree, validation_elbo=validation_elbo):
            return False  # saved before a restart: the files keep that ELBO, and so do we
        self.best_elbo = validation_elbo  # only once it is really saved
        return True

    def _save(self, manager, step: int, tree, **meta_extra) -> bool:
        """Saves the step unless it is saved already, with the checksums of its arrays in
        its meta; whether it saved."""
        self._settle(manager, wait=True)  # (a failure is the earlier step's, named so)
        try:
            if step in manager.all_steps():
                return False  # (e.g. an epoch end that is also a save point)
            meta = self._meta(step, checksums=checksums(tree), **meta_extra)
            manager.save(step, args=self._args(tree, meta), force=True)
        except (OSError, ValueError) as e:
            raise self._failed(step, e) from e
        self._pending[manager] = step
        return True

    def check_saved(self) -> None:
        """Raises CheckpointError if an asynchronous save has finished without committing
        its step; called between steps, so a failed save stops training at once."""
        if jax.process_count() > 1:
            return  # hosts would stop at different steps: the next save checks, on all
        for manager in list(self._pending):
            self._settle(manager, wait=False)

    def wait(self) -> None:
        """Blocks until every asynchronous save has been committed; raises the first
        failure once both have been waited for."""
        errors = []
        for manager in (self.latest, self.best):
            try:
                self._settle(manager, wait=True)
            except CheckpointError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def _settle(self, manager, wait: bool) -> None:
        """Checks that the manager's pending save (if it has finished, or after waiting
        for it) committed its step; raises CheckpointError naming that step if not."""
        step = self._pending.get(manager)
        if step is None:
            return manager.wait_until_finished() if wait else None
        if not wait and manager.is_saving_in_progress():
            return
        try:
            manager.wait_until_finished()
        except (OSError, ValueError) as e:
            del self._pending[manager]
            raise self._failed(step, e) from e
        del self._pending[manager]
        manager.reload()
        if step not in manager.all_steps():
            raise self._failed(step, None)

    def _failed(self, step: int, e: Exception | None) -> Exception:
        """CheckpointError for a save that failed, by its cause; other errors as they are
        (a ValueError that is not a storage error is a bug to be seen whole)."""
        cause = save_failure(e) if e is not None else "it was not committed (see the log)"
        if cause is None:
            return e
        error = CheckpointError(f"could not write the checkpoint for step {step} under "
                                f"{self.root}: {cause}; earlier checkpoints are intact.")
        # Orbax's background threads may still wait for the failed save (5 minutes for
        # a step directory that cannot be made): the process ends without them.
        error.abandons_threads = True
        return error

    def latest_step(self) -> int | None:
        """The newest step saved (or being saved) as the latest checkpoint."""
        return self.latest.latest_step()

    def close(self) -> None:
        self.latest.close()
        self.best.close()

    # ---- restoring ----
    def _keep_newest(self, restored: int) -> None:
        """Deletes the oldest latest/ checkpoints past checkpoint.keep (never `restored`):
        a run killed between a save and Orbax's removal of the oldest leaves one more."""
        keep = self.config.checkpoint.keep
        steps = sorted(self.latest.all_steps())
        if keep and len(steps) > keep:
            for step in steps[:-keep]:
                if step == restored:
                    continue
                try:
                    self.latest.delete(step)
                except OSError as e:  # (tidying only: the run goes on)
                    logging.warning("could not delete the checkpoint at step %d past "
                                    "checkpoint.keep=%d: %s", step, keep, e)

    def restore_latest(self, target: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        """(step, tree) of the newest readable checkpoint, or None if there is none.

        Newer checkpoints that cannot be read are moved to checkpoints/corrupt/ with a
        warning once an older one has been read. If none can be read, nothing is moved
        and the error shows why (a version mismatch fails every checkpoint alike, and is
        not corruption). A config mismatch is an error naming the keys.
        """
        failed: list[tuple[int, str]] = []
        for step in sorted(self.latest.all_steps(), reverse=True):
            meta = self._read_meta(self.latest, step)
            if meta is None:
                failed.append((step, "its metadata is missing or unreadable"))
                continue
            check_format(meta, self.root / "latest" / str(step))
            check_config(meta["config"], self.config, self.root / "latest" / str(step))
            try:
                restored = self.latest.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target)))
            except Exception as e:  # noqa: BLE001 - any failure means unreadable here
                failed.append((step, error_summary(e)))
                continue
            damaged = checksum_mismatches(meta, restored["state"])
            if damaged:
                failed.append((step, f"its data are damaged: {damaged}"))
                continue
            for bad_step, reason in failed:
                self._quarantine(bad_step, reason)
            self._restore_best_record()
            self._keep_newest(step)
            return step, restored["state"]
        if failed:
            steps = [s for s, _ in failed]
            raise CheckpointError(
                f"no readable checkpoint in {self.root / 'latest'} (steps {steps}); the "
                f"newest failed with: {failed[0][1][:500]}. Nothing was moved or deleted. "
                "If the files are damaged, move checkpoints/ aside to start this run "
                "afresh; if fvae or its libraries changed, use the versions that wrote them.")
        self._set_aside_stale_best()
        return None

    def _restore_best_record(self) -> None:
        meta = self._read_meta(self.best, self.best.latest_step())
        if meta is not None:
            self.best_elbo = float(meta.get("validation_elbo", float("inf")))

    def _set_aside_stale_best(self) -> None:
        """A fresh start must not inherit another run's best checkpoint."""
        for step in self.best.all_steps():
            destination = self._move_aside(self.best, step, "previous_best")
            logging.warning("a best checkpoint from an earlier run (step %d) was moved to %s",
                            step, destination)

    def set_aside_best_between(self, after: int, upto: int) -> None:
        """Moves best checkpoints of steps in (after, upto] to checkpoints/previous_best
        and forgets their ELBO: a run resumed at `upto` that rewrites its log from
        `after` (see train.Schedule.log_resume_step) drops their validation lines. (A best
        step past `upto` is one the resumed run recomputes: save_best keeps it.)"""
        later = [s for s in self.best.all_steps() if after < s <= upto]
        for best_step in later:
            destination = self._move_aside(self.best, best_step, "previous_best")
            logging.warning("the best checkpoint at step %d belongs to a shorter run's last, "
                            "partial epoch; moved it to %s", best_step, destination)
        if later:
            self.best_elbo = float("inf")

    def _move_aside(self, manager, step: int, folder: str) -> pathlib.Path:
        """Moves a step's checkpoint out of `manager`'s directory into checkpoints/folder
        (by process 0 alone: every process of a multi-host job gets here) and makes the
        manager forget it, so that the step can be saved again."""
        destination = self.root / folder / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(pathlib.Path(manager.directory) / str(step)), destination)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"fvae_move_{folder}_{step}")
        manager.reload()
        return destination

    def _read_meta(self, manager, step: int | None) -> dict[str, Any] | None:
        if step is None:
            return None
        try:
            return manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception:  # noqa: BLE001
            return None

    def _quarantine(self, step: int, reason: str) -> None:
        destination = self._move_aside(self.latest, step, "corrupt")
        logging.warning("checkpoint at step %d is unreadable (%s); moved it to %s and "
                        "trying the previous one", step, reason[:300], destination)
        self.latest.reload()


def error_summary(e: BaseException, causes: int = 1) -> str:
    """A library's error in one line: its type and first line, without the TensorStore
    spec (hundreds of characters of JSON) or source locations it carries (with the next
    line where the first ends in ':', as Orbax's tree mismatch does), and the first line
    of what caused it."""
    text = str(e).split("See full TensorStore details", 1)[0]
    text = re.sub(r"\s*\[(?:source locations|tensorstore_spec)='.*?'\]", "", text).strip()
    lines = text.splitlines()
    first = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines or [""])[0]
    line = f"{type(e).__name__}: {first.rstrip('. ')}" if first else type(e).__name__
    cause = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if causes and cause is not None and cause is not e:
        line += f" ({error_summary(cause, causes - 1)})"
    return line


# TensorStore's status codes, as Orbax raises them (ValueError('RESOURCE_EXHAUSTED: ...')).
_STORAGE_STATUS = {"RESOURCE_EXHAUSTED": errno.ENOSPC, "PERMISSION_DENIED": errno.EACCES}


def save_failure(e: Exception) -> str | None:
    """What a failed save means and what to do; None if `e` is not a storage failure."""
    if isinstance(e, OSError):
        return write_failure(e)
    code = str(e).split(":", 1)[0].strip()
    number = _STORAGE_STATUS.get(code) or next(
        (n for n in (errno.ENOSPC, errno.EACCES, errno.EROFS) if os.strerror(n) in str(e)),
        None)
    if number is None:
        return None
    return write_failure(OSError(number, os.strerror(number)))


def write_failure(e: OSError) -> str:
    """What a failed write means and what to do, by its cause."""
    if e.errno == errno.ENOSPC:
        return f"the disk is full ({e}). Free space, or choose another --workdir"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"permission denied ({e}). Make the workdir writable, or choose another "
                "--workdir")
    return f"{e}. Choose another --workdir if it persists"


def check_format(meta: dict[str, Any], where) -> None:
    """Raises CheckpointError unless the checkpoint is of the format this fvae writes."""
    version = meta.get("format", 1)  # format 1 (before 2026-12) recorded none
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"the checkpoint in {where} has format version {version}; this fvae reads "
            f"version {FORMAT_VERSION} only. Train afresh in a new --workdir, or finish and "
            f"evaluate the run with the fvae that wrote it (format 1, whose best checkpoint "
            "was chosen on the test set: git commit 5ce2280).")


def check_config(saved: dict[str, Any], config: ml_collections.ConfigDict, where,
                 only: tuple[str, ...] | None = None) -> None:
    """Raises CheckpointError listing the keys that differ (see config_differences)."""
    differences = config_differences(saved, config, only)
    if differences:
        raise CheckpointError(
            f"the checkpoint in {where} was trained with a different config:\n  "
            + "\n  ".join(differences)
            + "\nUse the config it was trained with, or a new --workdir to start afresh.")


def read(workdir: str | pathlib.Path, which: str | int,
         target_for: Callable[[dict[str, Any]], dict[str, Any]]
         ) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(meta, tree, step) of the checkpoint `which` names ('latest', 'best' or a step)
    in a workdir, read-only; `target_for(meta)` gives the tree to restore into (the
    caller knows the model, this module does not)."""
    root = pathlib.Path(workdir).absolute() / "checkpoints"
    kind = "best" if which == "best" else "latest"
    if not root.parent.is_dir():
        raise CheckpointError(f"there is no workdir {workdir}: give the --workdir of a "
                              "trained run.")
    if not (root / kind).is_dir():
        raise CheckpointError(f"{workdir} has no {kind} checkpoints: is it a training "
                              "workdir, and did training reach its first save?")
    manager = ocp.CheckpointManager(root / kind, item_names=("state", "meta"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        step = manager.latest_step() if which in ("latest", "best") else int(which)
        if step is None or step not in manager.all_steps():
            raise CheckpointError(f"no checkpoint {which!r} in {root / kind} (steps: "
                                  f"{manager.all_steps()})")
        meta = manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
        check_format(meta, root / kind / str(step))
        tree = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target_for(meta))))["state"]
    finally:
        manager.close()
    damaged = checksum_mismatches(meta, tree)
    if damaged:
        raise CheckpointError(
            f"the checkpoint in {root / kind / str(step)} is damaged: {damaged}. It was "
            "not used. Evaluate another checkpoint ('latest' or a step), or retrain.")
    return meta, tree, step


# ---- checksums: a damaged checkpoint is never trusted ----
def _host_bytes(x) -> np.ndarray | None:
    """The bytes of an array (integers as int64), or None for one no process holds
    whole."""
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if not x.is_fully_addressable:
            if not x.is_fully_replicated:
                return None  # (sharded across hosts: Orbax checks its own chunks' sizes)
            x = x.addressable_data(0)
    x = np.asarray(x)
    if x.dtype.kind in "biu":  # (an int32 step is restored as a Python int)
        x = x.astype(np.int64)
    return np.ascontiguousarray(x).reshape(-1).view(np.uint8)


def checksums(tree: dict[str, Any]) -> dict[str, str]:
    """CRC-32 of every array's bytes, by its path in the tree (e.g.
    "['train_state']['params']['encoder']...")."""
    sums = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        data = _host_bytes(leaf)
        if data is not None:
            sums[jax.tree_util.keystr(path)] = f"{zlib.crc32(data):08x}"
    return sums


def checksum_mismatches(meta: dict[str, Any], tree: dict[str, Any]) -> str:
    """'' if every array with a checksum in `meta` matches it; else which do not."""
    saved = meta.get("checksums")
    if not saved:
        return ""  # (checkpoints written before checksums were recorded)
    now = checksums(tree)
    paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    bad = sorted(k for k, v in saved.items() if k in now and now[k] != v)
    # An array the checksums name that the checkpoint lacks, or one held whole here with
    # no checksum: the two do not describe the same arrays, so nothing was checked.
    unmatched = sorted(set(saved) - paths) + sorted(set(now) - set(saved))
    if unmatched:
        listed = ", ".join(unmatched[:3]) + (f" and {len(unmatched) - 3} more"
                                             if len(unmatched) > 3 else "")
        return (f"its saved checksums and its arrays do not match up: {len(unmatched)} "
                f"arrays are in one but not the other ({listed})")
    if not bad:  # (an array not held whole here is not compared: see _host_bytes)
        return ""
    listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return f"{len(bad)} of {len(saved)} arrays differ from the checksums saved with them ({listed})"

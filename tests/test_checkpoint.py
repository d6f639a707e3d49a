"""Checkpoints: exact resume after SIGKILL and SIGTERM, bad input, loading."""

import json
import logging
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fvae import checkpoint, configs, keys, losses, parallel, runs, steps, train
from conftest import write_experiment
from fvae.writer import read_metrics

ROOT = pathlib.Path(__file__).parent.parent
TIMING_KEYS = {"wall_time", "images_per_sec", "eval_seconds"}


def assert_same_params(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def assert_same_metrics(workdir_a, workdir_b):
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]  # noqa
    assert strip(read_metrics(workdir_a)) == strip(read_metrics(workdir_b))


class Run:
    """launch.py in a subprocess; output goes to files so a full pipe never blocks it."""

    def __init__(self, experiment, workdir):
        self.log = pathlib.Path(str(workdir) + f".{time.time_ns()}.log")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "launch.py"), "--config", str(experiment),
                 "--workdir", str(workdir)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    def output(self) -> str:
        return self.log.read_text()

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, self.output()


def start(experiment, workdir) -> Run:
    return Run(experiment, workdir)


def wait_for_checkpoint(workdir, run: Run, min_step: int, timeout: float = 120):
    latest = pathlib.Path(workdir) / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name) for p in latest.glob("*") if p.name.isdigit()] \
            if latest.exists() else []
        if steps and max(steps) >= min_step:
            return
        if run.proc.poll() is not None:
            pytest.fail(f"run ended before step {min_step}: {run.output()[-2000:]}")
        time.sleep(0.01)
    pytest.fail("no checkpoint appeared in time")


# A run long enough to be killed in the middle: 12 epochs of 8 steps, saved every 3 steps.
# One CPU device, like the in-process reference run, so the comparison can be bitwise.
LONG = {"train.num_epochs": 12, "checkpoint.every_steps": 3, "runtime.cpu_devices": 1}


@pytest.fixture(scope="module")
def uninterrupted(tiny_data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    state = train.train_and_evaluate(
        __import__("conftest").tiny_config(tiny_data_dir, **LONG), str(workdir))
    return workdir, state


def test_sigkill_and_resume_is_bit_identical(tiny_data_dir, tmp_path, uninterrupted):
    experiment = write_experiment(tmp_path / "exp.py", tiny_data_dir, **LONG)
    workdir = tmp_path / "run"
    run = start(experiment, workdir)
    wait_for_checkpoint(workdir, run, min_step=24)
    run.proc.send_signal(signal.SIGKILL)
    run.proc.wait()
    assert run.proc.returncode == -signal.SIGKILL, "the run finished before it was killed"
    killed_at = max(r["step"] for r in read_metrics(workdir))
    assert killed_at < 96

    code, out = start(experiment, workdir).finish()
    assert code == 0, out[-2000:]
    assert "resuming tiny from the checkpoint at step" in out

    _, _, params = runs.load_checkpoint(workdir)[:3]
    assert_same_params(params, uninterrupted[1].params)
    assert_same_metrics(workdir, uninterrupted[0])  # each epoch logged exactly once


def test_sigterm_saves_and_resumes_exactly(tiny_data_dir, tmp_path, uninterrupted):
    experiment = write_experiment(tmp_path / "exp.py", tiny_data_dir, **LONG)
    workdir = tmp_path / "run"
    run = start(experiment, workdir)
    wait_for_checkpoint(workdir, run, min_step=12)
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish(timeout=120)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM at step" in err and "rerun the same command" in err
    stopped_at = int(err.split("stopped by SIGTERM at step ")[1].split(":")[0])
    assert stopped_at in checkpoint.Checkpointer(workdir, _config(experiment)).latest.all_steps()

    code, out = start(experiment, workdir).finish()
    assert code == 0, out[-2000:]
    assert not (workdir / "figures").exists()  # report.num_figure_images=0: none drawn
    _, _, params = runs.load_checkpoint(workdir)[:3]
    assert_same_params(params, uninterrupted[1].params)
    assert_same_metrics(workdir, uninterrupted[0])


def _config(experiment):
    from fvae import configs
    return configs.load_config_file(experiment)


def nan_loss_when(predicate):
    """A vae_loss whose loss is NaN for batches where predicate(x) holds."""
    original = losses.vae_loss

    def patched(logits, mean, logvar, x, beta, loss_config):
        loss, parts = original(logits, mean, logvar, x, beta, loss_config)
        loss = jnp.where(predicate(x), jnp.nan, loss)
        return loss, {**parts, "loss": loss}
    return patched


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(make_config, tmp_path,
                                                                  monkeypatch):
    train.train_and_evaluate(make_config(**{"train.num_epochs": 1}), str(tmp_path))
    monkeypatch.setattr(losses, "vae_loss", nan_loss_when(lambda x: True))
    with pytest.raises(train.NonFiniteLossError, match=r"step (9|1[0-6]): .*loss=nan.*"
                       r"on_nonfinite=skip.*new --workdir.*checkpoint at step 8 is kept"):
        train.train_and_evaluate(make_config(**{"train.num_epochs": 2}), str(tmp_path))
    ckpt = checkpoint.Checkpointer(tmp_path, make_config())
    assert ckpt.latest.all_steps() == [8]
    _, _, params = runs.load_checkpoint(tmp_path)[:3]
    assert all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(params))
    # The advice holds: the same workdir resumes with on_nonfinite=skip (and stops, at
    # the end of an epoch of nothing but skipped steps, past max_skipped_fraction).
    with pytest.raises(train.NonFiniteLossError, match=r"epoch 2: 8 of 8 steps \(100%\).*"
                       "max_skipped_fraction=0.25"):
        train.train_and_evaluate(make_config(**{"train.num_epochs": 2,
                                                "train.on_nonfinite": "skip"}), str(tmp_path))
    assert [r["skipped"] for r in read_metrics(tmp_path) if r["split"] == "train"] == [0, 8]


def test_non_finite_loss_before_any_checkpoint_says_so(make_config, tmp_path, monkeypatch):
    monkeypatch.setattr(losses, "vae_loss", nan_loss_when(lambda x: True))
    with pytest.raises(train.NonFiniteLossError, match="No checkpoint had been saved yet"):
        train.train_and_evaluate(make_config(**{"train.num_epochs": 1}), str(tmp_path))


def test_non_finite_steps_can_be_skipped_and_counted(make_config, tmp_path, monkeypatch):
    monkeypatch.setattr(losses, "vae_loss", nan_loss_when(lambda x: x[0, 0, 0, 0] > 0.1))
    state = train.train_and_evaluate(make_config(**{"train.on_nonfinite": "skip",
                                                    "train.max_skipped_fraction": 1.0}),
                                     str(tmp_path))
    train_lines = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert sum(r["skipped"] for r in train_lines) > 0
    assert all(np.isfinite(r["loss"]) for r in train_lines)
    assert int(state.step) == 16  # skipped steps still advance the step counter
    assert all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(state.params))


def test_an_epoch_of_skipped_steps_is_logged_not_fatal(make_config, tmp_path, monkeypatch,
                                                        caplog):
    """With every step skipped (and max_skipped_fraction=1) there is no mean to check:
    the run goes on, warns, logs the epoch as skipped and keeps its initial parameters."""
    monkeypatch.setattr(losses, "vae_loss", nan_loss_when(lambda x: True))
    config = make_config(**{"train.on_nonfinite": "skip", "train.num_epochs": 1,
                            "report.log_every_steps": 1, "train.max_skipped_fraction": 1.0})
    state = train.train_and_evaluate(config, str(tmp_path))
    [line] = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert line["skipped"] == 8 and int(state.step) == 8
    assert "epoch 1: 8 of 8 steps (100%) had a non-finite loss and were skipped" in caplog.text
    initial = steps.create_train_state(config, train.training_model(
        config, parallel.make_data_parallel(1)), keys.RunKeys.from_seed(config.seed).init, 8)
    assert_same_params(state.params, initial.params)


def test_resuming_with_a_different_model_names_the_keys(make_config, tmp_path):
    train.train_and_evaluate(make_config(**{"train.num_epochs": 1}), str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match="model.latent_dim: checkpoint has 2"):
        train.train_and_evaluate(make_config(**{"model.latent_dim": 3}), str(tmp_path))
    # Keys that do not change the run's meaning may differ: training is extended.
    state = train.train_and_evaluate(make_config(**{"train.num_epochs": 3}), str(tmp_path))
    assert int(state.step) == 24
    # A shorter config would pass the longer run off as its own: refused, nothing moved.
    with pytest.raises(checkpoint.CheckpointError, match="at step 24, past the 16 steps"):
        train.train_and_evaluate(make_config(**{"train.num_epochs": 2}), str(tmp_path))
    assert runs.load_checkpoint(tmp_path).step == 24


def test_extending_a_run_that_ended_mid_epoch_equals_the_longer_run(make_config, tmp_path):
    """A 12-step run (its second epoch cut at 4 of 8 steps) extended to 24 steps logs
    what a 24-step run logs: the second epoch once, whole, with the same parameters."""
    longer = make_config(**{"train.num_steps": 24})
    reference = train.train_and_evaluate(longer, str(tmp_path / "uninterrupted"))
    train.train_and_evaluate(make_config(**{"train.num_steps": 12}), str(tmp_path / "run"))
    assert [(r["epoch"], r["step"]) for r in read_metrics(tmp_path / "run")
            if r["split"] == "train"] == [(1, 8), (2, 12)]
    state = train.train_and_evaluate(longer, str(tmp_path / "run"))
    assert_same_metrics(tmp_path / "uninterrupted", tmp_path / "run")
    assert_same_params(state.params, reference.params)
    # The short run's best checkpoint, at the partial epoch's end, was set aside.
    assert runs.load_checkpoint(tmp_path / "run", "best").step == runs.load_checkpoint(
        tmp_path / "uninterrupted", "best").step
    assert 12 not in checkpoint.Checkpointer(tmp_path / "run", longer).best.all_steps()


def rewrite_meta(step_dir: pathlib.Path, **changes) -> None:
    """Edits the JSON meta item of a saved checkpoint in place."""
    meta_file = step_dir / "meta" / "metadata"  # Orbax's JsonSave item
    meta = json.loads(meta_file.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    meta_file.write_text(json.dumps(meta))


def test_a_checkpoint_of_another_format_version_is_refused_not_moved(make_config, tmp_path):
    """Checkpoints record their format version; one of an older format (format 1 wrote
    none) gets an error naming its version and what to do, and is never set aside."""
    config = make_config(**{"train.num_epochs": 1})
    train.train_and_evaluate(config, str(tmp_path))
    step_dir = tmp_path / "checkpoints" / "latest" / "8"
    meta = runs.load_checkpoint(tmp_path)  # format 2 reads back
    assert meta.step == 8
    rewrite_meta(step_dir, format=None)
    with pytest.raises(checkpoint.CheckpointError, match="format version 1; this fvae "
                       "reads version 3 only"):
        train.train_and_evaluate(make_config(**{"train.num_epochs": 2}), str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match="format version 1"):
        runs.load_checkpoint(tmp_path)
    assert step_dir.is_dir() and not (tmp_path / "checkpoints" / "corrupt").exists()


def largest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_bytes(path: pathlib.Path, at: float, n: int = 4) -> None:
    """Inverts n bytes at fraction `at` of the file, keeping its size (as a disk might)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i:i + n] = bytes(b ^ 0xFF for b in data[i:i + n])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    ("truncated", "is unreadable"),
    ("manifest", "is unreadable (ValueError: DATA_LOSS"),  # OCDBT's index, cut short
    # Orbax reads these bytes without an error (they decompress to other numbers): only
    # the checksums in the meta tell.
    ("flipped", "is unreadable (its data are damaged: 1 of 81 arrays differ"),
])
def test_corrupt_checkpoint_falls_back_to_the_previous_one(make_config, tmp_path, caplog,
                                                           capfd, damage, reason):
    reference = train.train_and_evaluate(make_config(**{"train.num_epochs": 3}),
                                         str(tmp_path / "reference"))
    workdir = tmp_path / "run"
    train.train_and_evaluate(make_config(), str(workdir))  # checkpoints at steps 8, 16
    victim = largest_file(workdir / "checkpoints" / "latest" / "16")
    if damage == "manifest":
        victim = workdir / "checkpoints" / "latest" / "16" / "state" / "manifest.ocdbt"
    if damage in ("truncated", "manifest"):
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    else:
        flip_bytes(victim, 0.5)
    state = train.train_and_evaluate(make_config(**{"train.num_epochs": 3}), str(workdir))
    assert f"checkpoint at step 16 {reason}" in caplog.text
    [warning] = [r.getMessage() for r in caplog.records if "step 16 is unreadable" in r.getMessage()]
    assert "TensorStore(" not in warning and "\n" not in warning  # one line, no spec dump
    assert "Event loop is closed" not in capfd.readouterr().err  # (360 lines of it, once)
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints" / "corrupt").iterdir()] == ["16"]
    assert_same_params(state.params, reference.params)
    # The step set aside was saved again when the resumed run reached it.
    assert sorted(p.name for p in (workdir / "checkpoints" / "latest").iterdir()
                  if p.name.isdigit()) == ["16", "24", "8"]


def test_leftover_temporary_checkpoint_is_ignored(make_config, tmp_path):
    train.train_and_evaluate(make_config(), str(tmp_path))
    # What a save killed half-way leaves: an uncommitted temporary directory.
    tmp = tmp_path / "checkpoints" / "latest" / "24.orbax-checkpoint-tmp-1234"
    tmp.mkdir()
    (tmp / "garbage").write_bytes(b"\0" * 10)
    state = train.train_and_evaluate(make_config(**{"train.num_epochs": 3}), str(tmp_path))
    assert int(state.step) == 24


def test_no_readable_checkpoint_is_a_clear_error(make_config, tmp_path):
    train.train_and_evaluate(make_config(**{"train.num_epochs": 1}), str(tmp_path))
    for path in (tmp_path / "checkpoints" / "latest" / "8").rglob("*metadata*"):
        if path.is_file():
            path.unlink()
    lines = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint.*Nothing was"):
        train.train_and_evaluate(make_config(**{"train.num_epochs": 2}), str(tmp_path))
    # Every checkpoint failing alike is not evidence of corruption: nothing is moved.
    assert (tmp_path / "checkpoints" / "latest" / "8").is_dir()
    assert not (tmp_path / "checkpoints" / "corrupt").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == lines


def test_extending_a_run_whose_schedule_depends_on_its_length_is_refused(make_config,
                                                                         tmp_path):
    config = make_config(**{"train.num_epochs": 1, "optim.lr_schedule": "cosine"})
    train.train_and_evaluate(config, str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match="train.num_epochs: checkpoint has 1"):
        train.train_and_evaluate(make_config(**{"train.num_epochs": 2,
                                                "optim.lr_schedule": "cosine"}), str(tmp_path))


def test_a_fresh_start_sets_aside_an_earlier_runs_best_checkpoint(make_config, tmp_path):
    import shutil
    train.train_and_evaluate(make_config(**{"train.num_epochs": 1}), str(tmp_path))
    shutil.rmtree(tmp_path / "checkpoints" / "latest")  # only the best of that run is left
    train.train_and_evaluate(make_config(**{"train.num_epochs": 1, "seed": 5}), str(tmp_path))
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints" / "previous_best").iterdir()] == ["8"]
    config, _, _ = runs.load_checkpoint(tmp_path, "best")[:3]
    assert config.seed == 5


def test_unwritable_workdir_fails_before_training(make_config, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(checkpoint.CheckpointError, match="not writable"):
        train.train_and_evaluate(make_config(), str(tmp_path / "file" / "run"))


def test_load_latest_best_and_step(make_config, tmp_path):
    state = train.train_and_evaluate(make_config(**{"train.num_epochs": 3}), str(tmp_path))
    config, model, params = runs.load_checkpoint(tmp_path, "latest")[:3]
    assert config.model.latent_dim == 2 and config.name == "tiny"
    assert_same_params(params, state.params)
    _, _, best = runs.load_checkpoint(tmp_path, "best")[:3]
    _, _, first = runs.load_checkpoint(tmp_path, 8)[:3]
    elbos = [r["elbo"] for r in read_metrics(tmp_path) if r["split"] == "validation"]
    expected = [first, None, params][int(np.argmin(elbos))]
    if expected is not None:
        assert_same_params(best, expected)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["checkpoint"]["keep"] == 3
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint 5"):
        runs.load_checkpoint(tmp_path, 5)[:3]
    with pytest.raises(checkpoint.CheckpointError, match="there is no workdir"):
        runs.load_checkpoint(tmp_path / "nothing")[:3]
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="is it a training workdir"):
        runs.load_checkpoint(tmp_path / "empty")[:3]


def test_a_damaged_best_checkpoint_is_refused_when_read(make_config, tmp_path):
    train.train_and_evaluate(make_config(**{"train.num_epochs": 1}), str(tmp_path))
    flip_bytes(largest_file(tmp_path / "checkpoints" / "best" / "8"), 0.5)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"best/8 is damaged: 1 of 81 arrays differ .*not used"):
        runs.load_checkpoint(tmp_path, "best")


def test_checksums_cover_every_array_and_change_with_one_bit():
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": np.int32(7)},
            "k": jax.random.key(0)}
    sums = checkpoint.checksums(tree)
    assert sorted(sums) == ["['a']", "['b']['c']", "['k']"]
    assert checkpoint.checksum_mismatches({"checksums": sums}, tree) == ""
    flipped = {**tree, "a": tree["a"].at[1, 2].set(np.nextafter(np.float32(5), np.float32(6)))}
    assert checkpoint.checksum_mismatches({"checksums": sums}, flipped).startswith(
        "1 of 3 arrays differ from the checksums saved with them (['a'])")
    assert checkpoint.checksum_mismatches({}, flipped) == ""  # (none recorded)


def test_a_library_error_is_summarised_in_one_line():
    try:
        try:
            raise ValueError("DATA_LOSS: Error reading chunk\nmore [source locations='a.cc:1']")
        except ValueError as cause:
            raise Exception("Encountered error while reading array index: (slice(0, 3)). "
                            "See full TensorStore details: <bound method spec of TensorStore({"
                            '"driver": "zarr"})>') from cause
    except Exception as e:  # noqa: BLE001
        summary = checkpoint.error_summary(e)
    assert summary == ("Exception: Encountered error while reading array index: "
                       "(slice(0, 3)) (ValueError: DATA_LOSS: Error reading chunk)")


@pytest.mark.parametrize("case", ["renamed", "missing", "extra"])
def test_checksums_that_name_other_arrays_are_a_mismatch(case):
    """Checksums that do not name the checkpoint's arrays check nothing: that is never
    a pass."""
    tree = {"a": jnp.arange(6.0), "b": jnp.ones(3)}
    sums = checkpoint.checksums(tree)
    if case == "renamed":
        sums = {k.replace("'a'", "'z'"): v for k, v in sums.items()}
    elif case == "missing":
        sums = {k: v for k, v in sums.items() if "'b'" not in k}
    else:
        sums = {**sums, "['c']": "00000000"}
    found = checkpoint.checksum_mismatches({"checksums": sums}, tree)
    assert found.startswith("its saved checksums and its arrays do not match up"), found


def test_a_best_checkpoint_saved_before_a_restart_keeps_its_own_elbo(make_config, tmp_path):
    """An epoch recomputed after a restart (on a GPU, not bit for bit) cannot claim a
    lower ELBO for a step whose best checkpoint is already on disk with another."""
    config = make_config()
    model = train.training_model(config, parallel.make_data_parallel(1))
    state = steps.create_train_state(config, model, jax.random.key(0), 16)
    tree = steps.state_tree(state, steps.zero_metrics())
    ckpt = checkpoint.Checkpointer(tmp_path, config)
    assert ckpt.save_best(8, tree, 10.0)
    ckpt.wait()
    assert not ckpt.save_best(8, tree, 9.9) and ckpt.best_elbo == 10.0
    assert ckpt.save_best(16, tree, 9.9) and ckpt.best_elbo == 9.9
    ckpt.wait()
    ckpt.close()


def test_a_failed_write_is_explained_by_its_cause():
    import errno
    full = checkpoint.write_failure(OSError(errno.ENOSPC, "No space left on device"))
    denied = checkpoint.write_failure(PermissionError(errno.EACCES, "Permission denied"))
    assert full.startswith("the disk is full") and "Free space" in full
    assert denied.startswith("permission denied") and "Free" not in denied


def test_a_storage_error_from_orbax_is_named_by_its_cause():
    full = checkpoint.save_failure(ValueError('RESOURCE_EXHAUSTED: Error writing "x" in '
                                              'OCDBT database: No space left on device'))
    denied = checkpoint.save_failure(ValueError("PERMISSION_DENIED: Error opening file"))
    assert full.startswith("the disk is full") and "OCDBT" not in full
    assert denied.startswith("permission denied")
    unknown = checkpoint.save_failure(ValueError("UNKNOWN: write failed: No space left on device"))
    assert unknown.startswith("the disk is full")
    assert checkpoint.save_failure(ValueError("shapes do not match")) is None  # a bug


class _FailsInTheBackground:
    """A checkpoint manager whose asynchronous save of `step` fails after save() returns,
    as a full disk does: the failure shows when the save is waited for."""

    def __init__(self, manager, step: int):
        self._manager, self._step, self._failing = manager, step, False

    def __getattr__(self, name):
        return getattr(self._manager, name)

    def save(self, step, **kwargs):
        self._failing = self._failing or step == self._step
        return self._manager.save(step, **kwargs)

    def is_saving_in_progress(self):
        return not self._failing and self._manager.is_saving_in_progress()

    def wait_until_finished(self):
        self._manager.wait_until_finished()
        if self._failing:
            self._failing = False
            raise ValueError('RESOURCE_EXHAUSTED: Error writing "train_state" in OCDBT')


def test_a_failed_async_save_stops_training_at_the_next_step(make_config, tmp_path,
                                                              monkeypatch):
    real = checkpoint._manager
    monkeypatch.setattr(checkpoint, "_manager", lambda directory, *a: (
        _FailsInTheBackground(real(directory, *a), 4) if directory.name == "latest"
        else real(directory, *a)))
    config = make_config(**{"checkpoint.every_steps": 4,  # saves at steps 4 and 8,
                            "runtime.steps_per_dispatch": 1})  # checked after each step
    with pytest.raises(checkpoint.CheckpointError,
                       match="checkpoint for step 4 .*the disk is full.*intact"):
        train.train_and_evaluate(config, str(tmp_path))
    # it stopped before the epoch's end at step 8 (waiting for the next save would
    # have trained and evaluated the whole epoch first)
    assert not [r for r in read_metrics(tmp_path) if r["split"] == "validation"]


def test_closing_after_a_failure_does_not_repeat_it(caplog):
    """The pending save's failure, raised again as the files close, is not logged again
    beside the same error ending the run; another failure is."""
    import types
    failure = checkpoint.CheckpointError("could not write the checkpoint for step 8")

    class Failing:
        def __init__(self, error):
            self.error = error

        def wait(self):
            raise self.error

        def close(self):
            pass

    for error, logged in ((checkpoint.CheckpointError(str(failure)), False),
                          (OSError("the log is gone"), True)):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            train.close_all([types.SimpleNamespace(ckpt=Failing(error), writer=None)],
                            raise_first=False, raising=failure)
        assert ("while closing the run's files" in caplog.text) == logged


def test_a_save_that_ends_without_its_step_is_a_failure(make_config, tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, make_config())
    tree = {"w": np.arange(3.0)}
    assert ckpt.save(4, tree) is None
    ckpt.latest.wait_until_finished()
    shutil.rmtree(tmp_path / "checkpoints" / "latest" / "4")  # as if never committed
    with pytest.raises(checkpoint.CheckpointError, match="step 4.*not committed"):
        ckpt.check_saved()
    ckpt.check_saved()  # reported once
    ckpt.close()


def test_a_resume_deletes_checkpoints_past_keep(make_config, tmp_path):
    """A kill between a save and Orbax's removal of the oldest checkpoint leaves keep + 1
    of them (here: made by a run that kept 5); the next start keeps the newest `keep`."""
    longer = {"train.num_epochs": 2, "checkpoint.every_steps": 2}
    train.train_and_evaluate(make_config(**longer, **{"checkpoint.keep": 5}), str(tmp_path))
    config = make_config(**longer, **{"checkpoint.keep": 3})
    assert checkpoint.Checkpointer(tmp_path, config).latest.all_steps() == [8, 10, 12, 14, 16]
    train.train_and_evaluate(config, str(tmp_path))  # (finished: it only restores)
    assert checkpoint.Checkpointer(tmp_path, config).latest.all_steps() == [12, 14, 16]


def test_a_save_into_an_immutable_directory_ends_within_seconds(tiny_data_dir, tmp_path):
    """`chattr +i` on latest/: Orbax's threads wait 5 minutes for the step directory
    that cannot be made; launch.py says why and exits at once, with exit status 2."""
    experiment = write_experiment(tmp_path / "exp.py", tiny_data_dir,
                                  **{"checkpoint.every_steps": 4, "train.num_epochs": 1})
    workdir = tmp_path / "run"
    launch = [sys.executable, "launch.py", "--config", str(experiment), "--workdir",
              str(workdir)]
    root = pathlib.Path(__file__).parent.parent
    subprocess.run(launch, check=True, capture_output=True, cwd=root)
    latest = workdir / "checkpoints" / "latest"
    if shutil.which("chattr") is None or subprocess.run(
            ["chattr", "+i", str(latest)], capture_output=True).returncode:
        pytest.skip("no immutable flag here (chattr needs root and an ext4-like disk)")
    try:
        start = time.time()
        result = subprocess.run([*launch, "--config.train.num_epochs=2"], cwd=root,
                                capture_output=True, text=True, timeout=150)
        seconds = time.time() - start
    finally:
        subprocess.run(["chattr", "-i", str(latest)])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "could not write the checkpoint for step 12" in result.stderr
    assert "permission denied" in result.stderr and seconds < 100
    assert sorted(p.name for p in latest.iterdir()) == ["4", "8"]  # intact

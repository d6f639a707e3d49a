"""One process per workdir: a second one is refused by name, a dead one's lock is stale."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fvae import checkpoint, locking, runs, train


def write_lock(workdir, age_s: float = 0.0, **holder) -> None:
    """A lock file as another process would have left it, last refreshed `age_s` ago."""
    record = {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": locking._boot_id(),
              "pid_namespace": locking._pid_namespace(),
              "start_time": locking._start_time(os.getpid()), "purpose": "training x",
              "since": time.time() - age_s, "token": "theirs", **holder}
    path = workdir / locking.LOCK_NAME
    path.write_text(json.dumps(record))
    os.utime(path, (time.time() - age_s,) * 2)


def test_a_second_lock_is_refused_naming_the_holder_and_released_on_exit(tmp_path):
    with locking.WorkdirLock(tmp_path, "training tiny"):
        with pytest.raises(locking.WorkdirBusy) as refused:
            locking.WorkdirLock(tmp_path, "evaluating").acquire()
        assert f"PID {os.getpid()} on host {socket.gethostname()}" in str(refused.value)
        assert "training tiny" in str(refused.value)
    assert not (tmp_path / locking.LOCK_NAME).exists()
    with pytest.raises(ZeroDivisionError):  # released when the body raises, too
        with locking.WorkdirLock(tmp_path):
            1 / 0
    assert not (tmp_path / locking.LOCK_NAME).exists()


def test_the_lock_of_a_process_killed_with_sigkill_is_stale(tmp_path, caplog):
    holder = subprocess.run(
        [sys.executable, "-c",
         "import os, signal, sys; from fvae import locking; "
         "locking.WorkdirLock(sys.argv[1]).acquire(); os.kill(os.getpid(), signal.SIGKILL)",
         str(tmp_path)], check=False)
    assert holder.returncode == -signal.SIGKILL
    assert (tmp_path / locking.LOCK_NAME).exists()  # nothing could remove it
    with locking.WorkdirLock(tmp_path) as lock:
        assert json.loads((tmp_path / locking.LOCK_NAME).read_text())["token"] == lock.me["token"]
    assert "took over the stale lock" in caplog.text and "gone" in caplog.text
    assert not list(tmp_path.glob("fvae.lock*")) and not list(tmp_path.glob(".fvae.lock*"))


@pytest.mark.parametrize("holder, age_s, stale", [
    ({"pid": 999_999_999}, 0, True),  # no such process on this machine
    ({"start_time": "1"}, 0, True),  # our PID, reused: another process started then
    ({"boot_id": "another-boot"}, 0, True),  # written before this machine rebooted
    ({}, 0, False),  # alive here (this process)
    ({"host": "elsewhere", "pid": 1}, 60, False),  # another host, recent heartbeat
    ({"host": "elsewhere", "pid": 1}, locking.STALE_AFTER_S + 60, True),  # heartbeat gone
    # A container of the same hostname: its PID (here, none in ours) says nothing here,
    # so only its heartbeat counts.
    ({"pid_namespace": "pid:[1]", "pid": 999_999_999}, 60, False),
    ({"pid_namespace": "pid:[1]", "pid": 999_999_999}, locking.STALE_AFTER_S + 60, True),
])
def test_stale_locks_are_told_from_live_ones(tmp_path, holder, age_s, stale):
    write_lock(tmp_path, age_s, **holder)
    if stale:
        with locking.WorkdirLock(tmp_path):
            pass
    else:
        with pytest.raises(locking.WorkdirBusy, match="is in use"):
            locking.WorkdirLock(tmp_path).acquire()
        assert json.loads((tmp_path / locking.LOCK_NAME).read_text())["token"] == "theirs"


def test_a_half_written_lock_is_busy_until_it_is_old(tmp_path):
    (tmp_path / locking.LOCK_NAME).write_text('{"pid": ')
    with pytest.raises(locking.WorkdirBusy, match="incomplete"):
        locking.WorkdirLock(tmp_path).acquire()
    os.utime(tmp_path / locking.LOCK_NAME, (time.time() - 2 * locking.STALE_AFTER_S,) * 2)
    with locking.WorkdirLock(tmp_path):
        pass


def test_the_heartbeat_refreshes_the_lock_and_notices_losing_it(tmp_path, monkeypatch,
                                                                caplog):
    monkeypatch.setattr(locking, "HEARTBEAT_S", 0.05)
    path = tmp_path / locking.LOCK_NAME
    with locking.WorkdirLock(tmp_path):
        os.utime(path, (time.time() - 1000,) * 2)
        time.sleep(0.5)
        assert time.time() - path.stat().st_mtime < 100
        write_lock(tmp_path, token="intruder")
        time.sleep(0.5)
    assert "no longer this process's" in caplog.text
    assert json.loads(path.read_text())["token"] == "intruder"  # not ours: not removed


def test_training_and_evaluating_refuse_a_locked_workdir_before_any_work(make_config,
                                                                         tmp_path):
    train.train_and_evaluate(make_config(**{"train.num_epochs": 1}), str(tmp_path))
    assert not (tmp_path / locking.LOCK_NAME).exists()  # released at the end
    metrics = (tmp_path / "metrics.jsonl").read_text()
    write_lock(tmp_path, purpose="training tiny")
    with pytest.raises(locking.WorkdirBusy, match=f"PID {os.getpid()}"):
        train.train_and_evaluate(make_config(**{"train.num_epochs": 2}), str(tmp_path))
    with pytest.raises(locking.WorkdirBusy, match="is in use"):
        runs.evaluate_run(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == metrics
    assert not (tmp_path / "eval.json").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "latest").iterdir()) == ["8"]
    (tmp_path / locking.LOCK_NAME).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="there is no workdir"):
        runs.evaluate_run(tmp_path / "nothing")


@pytest.mark.parametrize("process", [0, 1])
def test_a_refusal_on_process_zero_stops_every_process_of_a_job(tmp_path, monkeypatch,
                                                                 process):
    """A multi-host job (two processes, faked): process 0 meets a live holder's lock;
    it raises the refusal naming the holder, and process 1 learns of it by broadcast
    and raises too, instead of waiting at the first collective."""
    import contextlib

    import jax
    from jax.experimental import multihost_utils
    write_lock(tmp_path)  # this process, alive
    sent = []

    def broadcast(value):  # process 0's value, as every process receives it
        sent.append(int(value))
        return value if process == 0 else 1

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: process)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
    match = "is in use" if process == 0 else "process 0 of this job could not lock .*says why"
    with pytest.raises(locking.WorkdirBusy, match=match), contextlib.ExitStack() as stack:
        locking.lock_for_job(stack, [(tmp_path, "training")])
    assert sent == [1 if process == 0 else 0]
    assert json.loads((tmp_path / locking.LOCK_NAME).read_text())["token"] == "theirs"


def test_any_failure_to_lock_on_process_zero_is_broadcast(tmp_path, monkeypatch):
    """Not only a live holder: a lock file that cannot be written stops the job too."""
    import contextlib

    import jax
    from jax.experimental import multihost_utils
    sent = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all",
                        lambda value: sent.append(int(value)) or value)

    def cannot_write(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(locking.WorkdirLock, "acquire", cannot_write)
    with pytest.raises(OSError, match="No space"), contextlib.ExitStack() as stack:
        locking.lock_for_job(stack, [(tmp_path, "training")])
    assert sent == [1]

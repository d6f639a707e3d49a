"""One process per workdir: a lock file that a second process meets with a refusal.

    with WorkdirLock(workdir, "training"):
        ...  # nobody else trains or evaluates into this workdir meanwhile

The lock is `workdir/fvae.lock`, created with O_CREAT | O_EXCL: atomic on local disks
and on NFS (v3 and later), where `flock`/`fcntl` locks may be unsupported, emulated, or
lost when a client reconnects. It records who holds it (PID, host, boot id, PID
namespace, the process's start time) and the holder refreshes its modification time every
`HEARTBEAT_S` seconds. A lock whose holder is gone is stale and is taken over with a
warning:
  - on the same machine, the holder's PID is not running, or runs another process
    (its start time differs), or the machine has rebooted since (another boot id):
    known at once, after `kill -9` too;
  - on another machine, or in another PID namespace (a container of the same
    hostname, whose PIDs are not ours to look up), its heartbeat is older than
    `STALE_AFTER_S`, measured against a file written now in the same directory (the
    file server's clock, so clocks that disagree between hosts do not matter).
The lock is removed on every exit Python sees (a normal end, an exception, SIGTERM or
Ctrl-C, which fvae turns into a clean stop); a killed process leaves a stale one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import socket
import threading
import time
import uuid

LOCK_NAME = "fvae.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir's lock; the message names it."""


def _boot_id() -> str | None:
    try:
        return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    """This process's PID namespace ('pid:[4026531836]' on Linux), None elsewhere: two
    containers may share a hostname, yet one's PIDs mean nothing in the other."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a
    reused PID from the holder; None where /proc has no such process or no /proc."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, after the command name


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def whoami(purpose: str) -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(),
            "pid_namespace": _pid_namespace(), "start_time": _start_time(pid),
            "purpose": purpose, "since": time.time(),
            "token": uuid.uuid4().hex}


def holder_alive(holder: dict, heartbeat_age: float) -> bool:
    """Whether the process that wrote `holder` may still be running."""
    me = whoami("")
    namespaces = (holder.get("pid_namespace"), me["pid_namespace"])
    if holder.get("host") == me["host"] and (None in namespaces  # (an older fvae's lock)
                                             or namespaces[0] == namespaces[1]):
        if holder.get("boot_id") and me["boot_id"] and holder["boot_id"] != me["boot_id"]:
            return False  # the machine has rebooted since
        pid = int(holder.get("pid", -1))
        if pid <= 0 or not _running(pid):
            return False
        started = _start_time(pid)
        return not (started and holder.get("start_time") and started != holder["start_time"])
    return heartbeat_age < STALE_AFTER_S


class WorkdirLock:
    """The lock on one workdir (see the module docstring); a context manager."""

    def __init__(self, workdir: str | os.PathLike, purpose: str = "training"):
        self.path = pathlib.Path(workdir) / LOCK_NAME
        self.purpose = purpose
        self.me: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock, taking over a stale one; WorkdirBusy if a live process has it."""
        for _ in range(5):  # (a lost race with another process breaking a stale lock)
            me = whoami(self.purpose)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:  # (a full disk, Ctrl-C): leave no lock behind
                self.path.unlink(missing_ok=True)
                raise
            self.me = me
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, daemon=True,
                                            name=f"fvae-lock-heartbeat {self.path}")
            self._thread.start()
            return
        raise WorkdirBusy(f"could not take {self.path}: other processes keep taking it")

    def release(self) -> None:
        """Removes the lock if it is still ours (a no-op if it was never taken)."""
        if self.me is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            holder, _ = self._read()
            if holder is not None and holder.get("token") == self.me["token"]:
                self.path.unlink(missing_ok=True)
        except OSError as e:
            logging.warning("could not remove the lock %s: %s", self.path, e)
        self.me = None

    # ---- the holder's heartbeat ----
    def _beat(self) -> None:
        warned = False
        while not self._stop.wait(HEARTBEAT_S):
            holder, _ = self._read()
            if holder is None or holder.get("token") != self.me["token"]:
                if not warned:
                    logging.error("the lock %s is no longer this process's (%s): another "
                                  "process may be writing into this workdir", self.path,
                                  "removed" if holder is None else f"held by {describe(holder)}")
                warned = True
                continue
            try:
                os.utime(self.path)
            except OSError as e:
                logging.warning("could not refresh the lock %s: %s", self.path, e)

    # ---- someone else's lock ----
    def _read(self) -> tuple[dict | None, float | None]:
        """(the holder's record or None if unreadable, the lock's heartbeat age in
        seconds by the filesystem's clock); (None, None) if there is no lock."""
        try:
            mtime = self.path.stat().st_mtime
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return None, None
        probe = self.path.with_name(f".{LOCK_NAME}.now.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            probe.write_text("")
            now = probe.stat().st_mtime
            probe.unlink()
        except OSError:
            now = time.time()  # (a read-only workdir: our own clock will do)
        try:
            holder = json.loads(text)
        except ValueError:  # (JSONDecodeError, and undecodable bytes)
            holder = None  # being written this instant, or cut short by a crash
        return (holder if isinstance(holder, dict) else None), now - mtime

    def _take_over_if_stale(self) -> None:
        holder, age = self._read()
        if age is None:
            return  # released meanwhile: try again
        if holder is None:
            if age < STALE_AFTER_S:
                raise WorkdirBusy(f"{self.path.parent} is being locked by another process "
                                  f"just now ({self.path} is incomplete). Wait, or use "
                                  "another --workdir.")
        elif holder_alive(holder, age):
            raise WorkdirBusy(
                f"{self.path.parent} is in use: {describe(holder)} has held {self.path} "
                f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('since', 0)))}. "
                "Wait for it to finish, stop it, or use another --workdir; if that process "
                f"is gone (e.g. its machine is down), delete {self.path}.")
        # Break it by renaming: of several processes doing this at once, one rename
        # succeeds; whoever then finds a lock other than the stale one puts it back.
        aside = self.path.with_name(f"{LOCK_NAME}.stale.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text())
        except (OSError, json.JSONDecodeError):
            moved = None
        moved_token = moved.get("token") if isinstance(moved, dict) else None
        if moved_token is not None and moved_token != (holder or {}).get("token"):
            try:  # a fresh lock taken in between: give it back (link fails if one exists)
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        logging.warning("took over the stale lock %s of %s (%s)", self.path,
                        describe(holder) if holder else "an unknown process",
                        f"gone; last heartbeat {age:.0f} s ago" if holder else
                        f"left incomplete {age:.0f} s ago")


def lock_for_job(stack: contextlib.ExitStack,
                 workdirs_and_purposes: list[tuple[os.PathLike, str]]) -> None:
    """Locks each workdir into `stack` from process 0 of the job (its processes share
    the workdirs). If process 0 is refused, every process raises WorkdirBusy, so that
    none goes on to wait at a collective for a process that stopped."""
    import jax
    failure = None
    if jax.process_index() == 0:
        try:
            for workdir, purpose in workdirs_and_purposes:
                stack.enter_context(WorkdirLock(workdir, purpose))
        except BaseException as e:  # noqa: BLE001 - whatever it is, the others must hear
            failure = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils
        failed = int(multihost_utils.broadcast_one_to_all(np.int32(failure is not None)))
        if failed and failure is None:
            workdirs = ", ".join(str(w) for w, _ in workdirs_and_purposes)
            raise WorkdirBusy(f"process 0 of this job could not lock {workdirs} (its log "
                              "says why: another run holds one, or it could not be written)")
    if failure is not None:
        raise failure


def describe(holder: dict) -> str:
    return (f"{holder.get('purpose', 'a process')} (PID {holder.get('pid')} on host "
            f"{holder.get('host')})")

"""One driver per experiment: a lock file in the experiment folder, naming its holder.

Two drivers on one experiment would share Tune's state and the Optuna study and delete each
other's checkpoints. The lock (``<storage>/<name>/driver.lock``: host, pid, the process's start
time) is created with O_EXCL, so of two drivers starting at once one wins. A lock whose holder
is gone (same host, no such process, or a new process under a reused pid) is stale and taken
over; a lock held from another host cannot be checked and is reported with its path.

In remote storage (``s3://...``) the lock is an object with the same record. Object stores
have no exclusive create here: the lock is taken by reading that no live driver holds it,
writing it, and reading it back after a moment; two drivers starting within that moment may
both believe they hold it. Best effort: it stops the usual mistake (a second search of a
running experiment), not a race.
"""
from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime, timezone

from virface import storage
from virface.errors import VirFaceError, WriteError

LOCK_NAME = "driver.lock"
# Remote lock: how long a written lock is left before it is read back to see who won.
REMOTE_SETTLE_S = 1.0


class ExperimentLockedError(VirFaceError):
    """Another driver holds the experiment."""


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), None if there is no
    such process. Without /proc only whether it exists is known (0.0)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            # Field 22 counts from after the parenthesised command name, which may hold spaces.
            return float(f.read().rsplit(")", 1)[1].split()[19])
    except FileNotFoundError:
        if os.path.isdir("/proc"):
            return None
    except (OSError, IndexError, ValueError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return 0.0


def _holder_alive(holder: dict) -> bool:
    started = _process_start(int(holder.get("pid", -1)))
    # A pid reused by a later process is not the holder.
    return started is not None and started == float(holder.get("process_start") or started)


def lock_holder(folder: str) -> tuple[dict | None, bool]:
    """``(holder, alive)`` of the experiment in ``folder``: the lock's record and whether that
    driver still runs (a holder on another host cannot be checked and counts as alive);
    ``(None, False)`` when nobody holds it."""
    path = storage.join(folder, LOCK_NAME)
    try:
        holder = json.loads(storage.read_bytes(path))
    except (OSError, ValueError):
        return None, False
    if not isinstance(holder, dict):
        return None, False
    if holder.get("host") != socket.gethostname():
        return holder, True
    return holder, _holder_alive(holder)


def describe_holder(holder: dict) -> str:
    where = "this machine" if holder.get("host") == socket.gethostname() else f"host {holder.get('host')}"
    return f"pid {holder.get('pid')} on {where}, since {holder.get('since')}"


class ExperimentLock:
    """``with ExperimentLock(folder):`` holds the experiment for this process."""

    def __init__(self, folder: str):
        self.path = storage.join(folder, LOCK_NAME)
        self.folder = folder
        self.held = False

    def acquire(self) -> None:
        try:
            if storage.is_uri(self.path):
                self._acquire_remote()
            else:
                self._acquire()
        except OSError as exc:
            if isinstance(exc, WriteError):
                raise
            # The first write of a search: a --storage that is a file, or on a read-only place.
            raise WriteError(f"{os.path.dirname(self.path)}: cannot create the experiment folder or "
                             f"write into it ({exc.strerror or exc}: {exc.filename or self.path}); "
                             f"--storage must be a folder this process can write; nothing was "
                             f"written") from None

    def _acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = self._me()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder == {}:
                    continue              # released meanwhile
                if holder and holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
                    return                # this process holds it already (a comparison's arms)
                if holder is None or (holder.get("host") == me["host"] and not _holder_alive(holder)):
                    self._remove_stale()
                    continue
                self._locked_by(holder, me)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            return
        raise ExperimentLockedError(f"{self.path}: could not take the lock (it keeps changing hands)")

    @staticmethod
    def _me() -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def _acquire_remote(self) -> None:
        me = self._me()
        for _ in range(3):
            holder, alive = lock_holder(self.folder)
            mine = holder and holder.get("host") == me["host"] and holder.get("pid") == me["pid"]
            if mine:
                return                    # this process holds it already (a comparison's arms)
            if holder and alive:
                self._locked_by(holder, me)
            storage.write_bytes(self.path, json.dumps(me).encode())
            time.sleep(REMOTE_SETTLE_S)
            holder, _ = lock_holder(self.folder)
            if holder == json.loads(json.dumps(me)):
                self.held = True
                return
        raise ExperimentLockedError(f"{self.path}: could not take the lock (it keeps changing hands)")

    def _locked_by(self, holder: dict, me: dict):
        where = "this machine" if holder.get("host") == me["host"] else f"host {holder.get('host')}"
        raise ExperimentLockedError(
            f"{self.folder} is being searched by another driver (pid "
            f"{holder.get('pid')} on {where}, since {holder.get('since')}); wait for it "
            f"to finish or stop it, then run again (with --resume if it was interrupted). "
            f"If that driver is gone, delete {self.path}") from None

    def _read_holder(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return {}             # released meanwhile: try again
        except (OSError, ValueError):
            # Half-written by a driver killed while taking it: stale once it is a little old.
            try:
                age = time.time() - os.path.getmtime(self.path)
            except OSError:
                return {}
            return None if age > 5 else {"host": "?", "pid": "?", "since": "a moment ago"}

    def _remove_stale(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if storage.is_uri(self.path):
            holder, _ = lock_holder(self.folder)
            if holder and holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
                storage.delete(self.path)     # not one another driver took over meanwhile
        else:
            self._remove_stale()

    def __enter__(self) -> "ExperimentLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

"""A search's saved state, resumable after a write that failed (a full disk).

Two files decide what ``--resume`` continues, and neither is written atomically by its engine:
- Tune's experiment state (``search_<stage>/experiment_state-*.json``) is rewritten in place
  every second; a full disk leaves it cut short, and Tune's restore then fails on it
  (``JSONDecodeError``). :class:`TuneStateKeeper` copies each complete version to
  ``<stage>/tune_state/``; :func:`repair_tune_state` puts the last complete one back before a
  restore.
- The Optuna journal (``<stage>/optuna.journal``) is appended a line per change; a full disk cuts
  the last line, the next append is glued to it, and replaying the journal then fails.
  :func:`repair_journal` drops a cut last line before the journal is opened again.
Both say what they did. With remote storage (``s3://...``) Tune's state lives there, written
as whole objects, and neither repair of it applies; the journal is the driver's local copy,
sent after every append (:class:`MirroredJournalBackend`).
"""
from __future__ import annotations

import errno
import fnmatch
import json
import os
import pickle
from typing import Callable

from optuna.storages.journal import JournalFileBackend
from ray.tune import Callback

from virface import storage
from virface.errors import VirFaceError
from virface.fileio import write_text_atomic

TUNE_STATE_PATTERN = "experiment_state-*.json"   # Tune's TuneController.CKPT_FILE_TMPL
KEPT_STATE_DIR = "tune_state"
# Errors of a write that could not be completed, or of reading back what such a write left.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)


class StateError(VirFaceError):
    """A search's saved state cannot be made resumable."""


def _tune_states(search_dir: str) -> list[str]:
    try:
        names = os.listdir(search_dir)
    except OSError:
        return []
    return sorted(n for n in names if fnmatch.fnmatch(n, TUNE_STATE_PATTERN))


def _complete_json(path: str) -> str | None:
    """The file's text if it is one complete JSON document, else None."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        json.loads(text)
        return text
    except (OSError, ValueError):
        return None


class TuneStateKeeper(Callback):
    """Copies every complete version of Tune's experiment state to ``kept_dir`` as Tune saves it
    (checked after each step of Tune's loop; a version that is cut short is not copied)."""

    def __init__(self, search_dir: str, kept_dir: str):
        self.search_dir, self.kept_dir = search_dir, kept_dir
        self._seen: dict[str, tuple[int, int]] = {}

    def keep(self) -> None:
        for name in _tune_states(self.search_dir):
            path = os.path.join(self.search_dir, name)
            try:
                stat = os.stat(path)
            except OSError:
                continue
            key = (stat.st_size, stat.st_mtime_ns)
            if self._seen.get(name) == key:
                continue
            text = _complete_json(path)
            if text is None:
                continue            # cut short (or being written): the last complete copy stays
            try:
                write_text_atomic(os.path.join(self.kept_dir, name), text)
            except OSError:
                continue            # a full disk: the last complete copy stays
            self._seen[name] = key

    def on_step_end(self, iteration, trials, **info):
        self.keep()

    def on_experiment_end(self, trials, **info):
        self.keep()


def repair_tune_state(search_dir: str, kept_dir: str, say: Callable[[str], None]) -> None:
    """Before Tune restores ``search_dir``: an experiment state cut short by a failed write is
    replaced by its last complete copy; without one, a StateError names the file."""
    for name in _tune_states(search_dir):
        path = os.path.join(search_dir, name)
        if _complete_json(path) is not None:
            continue
        kept = _complete_json(os.path.join(kept_dir, name))
        if kept is None:
            raise StateError(f"{path}: Tune's experiment state is cut short (a write that failed: a "
                             f"full disk?) and {kept_dir} holds no complete copy of it; the search "
                             f"cannot be resumed: search again under another --name")
        write_text_atomic(path, kept)
        say(f"{path} was cut short (a write that failed); put back its last complete version, "
            f"from {os.path.join(kept_dir, name)}")


class MirroredJournalBackend(JournalFileBackend):
    """The Optuna journal file, and with remote storage (``remote``: its URI) sent there whole
    after every append, before Optuna goes on: the remote journal is never behind what Tune's
    state (saved later) knows, only ahead of it, which a restore accepts (virface.search.searcher).
    A driver killed between an append and its upload leaves the remote journal one append
    behind the local file; the remote one is what ``--resume`` continues."""

    def __init__(self, file_path: str, remote: str | None = None):
        super().__init__(file_path)
        self.remote = remote

    def append_logs(self, logs):
        super().append_logs(logs)
        if self.remote is not None:
            storage.upload_file(self._file_path, self.remote)


def repair_journal(path: str, say: Callable[[str], None]) -> None:
    """Drop a last line of the Optuna journal ``path`` that a failed append cut short (no newline,
    or not JSON), so that the next append starts on a line of its own."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return
    if data.endswith(b"\n"):
        start = data.rfind(b"\n", 0, len(data) - 1) + 1
        try:
            json.loads(data[start:-1])
            return
        except ValueError:
            keep = start
    elif data:
        keep = data.rfind(b"\n") + 1      # 0: the only line is cut
    else:
        return
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    say(f"{path}: dropped its last record, cut short by a write that failed ({len(data) - keep} "
        f"byte(s): {data[keep:keep + 60]!r}...)")


def is_disk_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a write that could not complete, or the reading
    back of a file such a write cut short (a pickle Tune wrote: EOFError, UnpicklingError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and (exc.errno in DISK_ERRNOS or "No space left" in str(exc)):
            return True
        if isinstance(exc, (EOFError, pickle.UnpicklingError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class MirrorKeeper(Callback):
    """With remote storage: sends the driver's records that changed (a trial's TensorBoard
    HParams entry, written as it ends) when a trial ends and when the stage's search ends. Put it
    after the callback that writes them."""

    def __init__(self, mirror: "storage.ExperimentMirror"):
        self.mirror = mirror

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.mirror.sync()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.mirror.sync()

    def on_experiment_end(self, trials, **info):
        self.mirror.sync()

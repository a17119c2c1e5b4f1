"""Reading and writing files: atomic writes (readers see the old file or the new one, never half
of one), and reads whose errors name the file and the line."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator

from virface.errors import WriteError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was; a failed
    write (a full disk, a read-only folder) raises :class:`WriteError` naming ``path``. Folders
    are created. The temporary name starts with a dot so that listings of the folder skip it.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise WriteError(f"{path}: cannot write ({exc.strerror or exc}); nothing was changed") from exc
    try:
        # mkstemp makes the file 0600; give it the mode open() would (0666 less the umask), so
        # results and checkpoints on shared storage stay readable by those who could read them.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(f"{path}: cannot write ({exc.strerror or exc}); the file is as it "
                             f"was before") from exc
        raise


def _umask() -> int:
    mask = os.umask(0o022)      # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def read_text(path: str | os.PathLike, what: str, error: type[Exception]) -> str:
    """The text of ``path``; a missing or unreadable file raises ``error`` naming it and ``what``
    it was meant to be ("manifest", "search space file")."""
    where = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise error(f"{where}: {what} not found") from None
    except OSError as e:
        raise error(f"{where}: cannot read the {what}: {e}") from None


def read_two_field_lines(path: str, number_field: int, expected: str,
                         error: type[Exception]) -> list[tuple[int, str, int]]:
    """``(line number, text field, integer field)`` of each non-blank line of a two-field list
    (a meta list's ``path label``, a CFP list's ``index path``). ``number_field`` is 0 or 1: where
    the integer is; the text field may hold spaces. A bad line raises ``error`` naming file:line."""
    rows = []
    with open(path, "r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            fields = text.rsplit(maxsplit=1) if number_field == 1 else text.split(maxsplit=1)
            try:
                if len(fields) != 2:
                    raise ValueError
                number = int(fields[number_field])
            except ValueError:
                raise error(f"{path}:{line_no}: expected {expected!r}, got {text!r}") from None
            rows.append((line_no, fields[1 - number_field], number))
    return rows

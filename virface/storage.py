"""Storage that is a local folder or a URI (``s3://bucket/prefix``), through pyarrow's file systems,
the ones Ray Tune and Ray Train use for their ``storage_path``.

Every function takes a local path or a URI; a local path behaves exactly as plain file access.
A URI is resolved by ``pyarrow.fs.FileSystem.from_uri``:
- ``s3://bucket/prefix``: credentials and endpoint from the standard AWS variables
  (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``,
  ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``) or from the URI's query, which pyarrow reads:
  ``s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http&region=us-east-1``
  (also ``allow_bucket_creation``, ``tls_verify_certificates``, ...). A query is kept on every URI
  derived from it (``join``), so each of them resolves the same way.
- ``gs://``, ``abfs://``, ``hdfs://``: what pyarrow resolves, the same way (untested here).

Writes are whole: a local file is written beside its name and renamed into place
(:func:`virface.fileio.atomic_open`); an object is sent in one write and appears when the upload
completes (a process killed before leaves nothing, never half an object).
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
from typing import Iterable
from urllib.parse import urlsplit, urlunsplit

from virface.errors import VirFaceError
from virface.fileio import atomic_open

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


class StorageError(VirFaceError):
    """A storage URI that cannot be used: malformed, a missing bucket, an unreachable endpoint,
    refused credentials. The message names the URI."""


def is_uri(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a URI (``s3://...``) rather than a local path."""
    return path is not None and bool(_URI.match(os.fspath(path)))


def without_credentials(uri: str) -> str:
    """``uri`` without a ``user:secret@`` part (for messages and records)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def join(base: str, *names: str) -> str:
    """``base`` with ``names`` appended as path components; a URI keeps its query after them."""
    if not is_uri(base):
        return os.path.join(base, *names)
    parts = urlsplit(base)
    path = "/".join([parts.path.rstrip("/"), *(n.strip("/") for n in names if n)])
    return urlunsplit(parts._replace(path=path))


def basename(path: str) -> str:
    return os.path.basename(urlsplit(path).path.rstrip("/") if is_uri(path) else path)


def uri_for(base: str, fs_path: str) -> str:
    """The URI of ``fs_path`` (a path on ``base``'s file system, as pyarrow and Ray give it:
    ``bucket/key``) with ``base``'s scheme and query; a local ``base`` gives ``fs_path``."""
    if not is_uri(base) or is_uri(fs_path) or os.path.isabs(fs_path):
        return fs_path
    parts = urlsplit(without_credentials(base))
    bucket, _, key = fs_path.partition("/")
    return urlunsplit(parts._replace(netloc=bucket, path="/" + key))


@functools.lru_cache(maxsize=16)
def _filesystem(root: str):
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(root)[0]
    except (ValueError, OSError, TypeError) as exc:
        raise StorageError(f"storage {without_credentials(root)}: not a URI pyarrow can open "
                           f"({exc})") from None


def resolve(path: str):
    """``(file system, path on it)`` of a local path or a URI. File systems are made once per
    scheme, bucket and query."""
    import pyarrow.fs

    if not is_uri(path):
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(path)
    parts = urlsplit(path)
    fs = _filesystem(urlunsplit(parts._replace(path="")))
    return fs, (parts.netloc.rsplit("@", 1)[-1] + parts.path).rstrip("/")


def storage_error(path: str, exc: BaseException, doing: str) -> StorageError:
    """A pyarrow error as a StorageError naming the URI and what the usual causes are."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hints = []
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        hints.append(f"the bucket {urlsplit(path).netloc.rsplit('@', 1)[-1]} does not exist: create it")
    elif "NETWORK_CONNECTION" in text or "connect" in text.lower():
        hints.append("the endpoint cannot be reached: check AWS_ENDPOINT_URL or the URI's "
                     "?endpoint_override=HOST:PORT&scheme=http")
    elif "ACCESS_DENIED" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text \
            or "credentials" in text.lower() or "403" in text:
        given = "set" if os.environ.get("AWS_ACCESS_KEY_ID") else "not set"
        hints.append(f"the credentials were refused (AWS_ACCESS_KEY_ID is {given}; also "
                     f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE)")
    hint = f"; {hints[0]}" if hints else ""
    return StorageError(f"storage {without_credentials(path)}: cannot {doing} ({text}){hint}")


def check_reachable(uri: str) -> None:
    """Before anything is written: ``uri``'s bucket exists and its endpoint answers (for a
    local path: nothing to check here). A StorageError names the URI and the likely cause."""
    if not is_uri(uri):
        return
    import pyarrow.fs

    fs, path = resolve(uri)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        raise storage_error(uri, exc, "reach the storage") from None
    if info.type == pyarrow.fs.FileType.NotFound:
        raise StorageError(f"storage {without_credentials(uri)}: the bucket {bucket} does not exist "
                           f"(or these credentials cannot see it): create it first; nothing was written")


def exists(path: str) -> bool:
    if not is_uri(path):
        return os.path.exists(path)
    import pyarrow.fs

    fs, p = resolve(path)
    try:
        return fs.get_file_info(p).type != pyarrow.fs.FileType.NotFound
    except OSError as exc:
        raise storage_error(path, exc, "look at") from None


def is_file(path: str) -> bool:
    if not is_uri(path):
        return os.path.isfile(path)
    import pyarrow.fs

    fs, p = resolve(path)
    try:
        return fs.get_file_info(p).type == pyarrow.fs.FileType.File
    except OSError as exc:
        raise storage_error(path, exc, "look at") from None


def read_bytes(path: str) -> bytes:
    """The content of a file or object; FileNotFoundError when there is none."""
    if not is_uri(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = resolve(path)
    if not is_file(path):
        raise FileNotFoundError(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except OSError as exc:
        raise storage_error(path, exc, "read") from None


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` whole: readers see the old content or the new, never part of it."""
    if not is_uri(path):
        with atomic_open(path, "wb") as f:
            f.write(data)
        return
    fs, p = resolve(path)
    try:
        # One write into the stream: pyarrow sends it when the stream closes (a single upload,
        # or parts completed only at the close), so the object is whole or absent.
        with fs.open_output_stream(p) as f:
            f.write(data)
    except OSError as exc:
        raise storage_error(path, exc, "write") from None


def delete(path: str) -> None:
    """Remove a file or object; nothing when there is none."""
    if not is_uri(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    fs, p = resolve(path)
    try:
        fs.delete_file(p)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exists(path):
            raise storage_error(path, exc, "delete") from None


def upload_file(local: str, target: str) -> None:
    with open(local, "rb") as f:
        write_bytes(target, f.read())


def download_file(source: str, local: str) -> None:
    """Copy ``source`` (a path or URI) to the local file ``local``, atomically."""
    data = read_bytes(source)
    with atomic_open(local, "wb") as f:
        f.write(data)


def list_files(root: str) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (recursively): relative path (``/``-separated) -> (size, mtime
    in ns). Empty when ``root`` does not exist."""
    import pyarrow.fs

    fs, p = resolve(root)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(p, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise storage_error(root, exc, "list") from None
    return {info.path[len(p):].lstrip("/"): (info.size, info.mtime_ns or 0) for info in infos
            if info.type == pyarrow.fs.FileType.File}


def list_folders(root: str) -> list[str]:
    """The names of the folders directly under ``root``, sorted; empty when it does not exist."""
    import pyarrow.fs

    fs, p = resolve(root)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(p, recursive=False, allow_not_found=True))
    except OSError as exc:
        raise storage_error(root, exc, "list") from None
    return sorted(os.path.basename(i.path.rstrip("/")) for i in infos if i.type == pyarrow.fs.FileType.Directory)


def cache_root() -> str:
    """Where local copies of remote storage live: ``$VIRFACE_CACHE_DIR/storage`` (default
    ``~/.cache/virface/storage``)."""
    base = os.environ.get("VIRFACE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "virface"))
    return os.path.join(base, "storage")


def _key(uri: str) -> str:
    """A folder name for ``uri``: readable, and distinct per endpoint (the same bucket name on two
    endpoints is two buckets)."""
    parts = urlsplit(without_credentials(uri))
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "") if parts.scheme == "s3" else ""
    digest = hashlib.sha1(f"{uri}|{endpoint}".encode()).hexdigest()[:10]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{parts.netloc}{parts.path}").strip("_")[-60:]
    return f"{parts.scheme}-{readable}-{digest}"


def mirror_dir(uri: str) -> str:
    """The local folder that mirrors the driver's own records under the storage ``uri``."""
    return os.path.join(cache_root(), "mirrors", _key(uri))


def local_file(path: str) -> str:
    """A local path of the file ``path``: itself, or for a URI a downloaded copy (kept in the
    cache, keyed by the object's URI, size and time, so that an object rewritten under the same
    name is fetched again)."""
    if not is_uri(path):
        return path
    import pyarrow.fs

    fs, p = resolve(path)
    try:
        info = fs.get_file_info(p)
    except OSError as exc:
        raise storage_error(path, exc, "look at") from None
    if info.type != pyarrow.fs.FileType.File:
        raise FileNotFoundError(path)
    folder = os.path.join(cache_root(), "downloads", _key(f"{path}|{info.size}|{info.mtime_ns}"))
    local = os.path.join(folder, basename(path))
    if not os.path.isfile(local):
        download_file(path, local)
    return local


class TreeSync:
    """Uploads the files of a local folder to a remote one as they change: each ``sync()`` sends
    every file whose size or time changed since the last one sent (whole, one object each).
    ``remote`` None: nothing to do (local storage)."""

    def __init__(self, local: str, remote: str | None, exclude: Iterable[str] = ()):
        self.local, self.remote = local, remote
        self.exclude = tuple(exclude)      # fnmatch patterns of relative paths
        self.sent: dict[str, tuple[int, int]] = {}

    def _changed(self) -> list[str]:
        import fnmatch

        changed = []
        for folder, _, files in os.walk(self.local):
            for name in files:
                full = os.path.join(folder, name)
                rel = os.path.relpath(full, self.local).replace(os.sep, "/")
                if name.startswith(".") and name.endswith(".tmp"):
                    continue            # an atomic write under way
                if any(fnmatch.fnmatch(rel, pattern) for pattern in self.exclude):
                    continue
                try:
                    stat = os.stat(full)
                except FileNotFoundError:
                    continue
                if self.sent.get(rel) != (stat.st_size, stat.st_mtime_ns):
                    changed.append(rel)
        return sorted(changed)

    def push(self, rel: str) -> None:
        """Send one file (relative to ``local``) now."""
        if self.remote is None:
            return
        full = os.path.join(self.local, rel)
        stat = os.stat(full)
        upload_file(full, join(self.remote, rel.replace(os.sep, "/")))
        self.sent[rel.replace(os.sep, "/")] = (stat.st_size, stat.st_mtime_ns)

    def sync(self, skip: Iterable[str] = ()) -> list[str]:
        """Send every changed file but those in ``skip``; returns what was sent."""
        if self.remote is None or not os.path.isdir(self.local):
            return []
        sent = [rel for rel in self._changed() if rel not in set(skip)]
        for rel in sent:
            self.push(rel)
        return sent


class ExperimentMirror(TreeSync):
    """The search driver's local copy of its own records of one experiment kept in remote
    storage: manifests, trial tables, the Optuna journal, the recorded search space, the
    TensorBoard HParams files. ``pull()`` makes the records equal to the remote ones (the
    remote copy is the truth: a local file it lacks is removed); writes go to the local copy and
    are sent with ``push``/``sync``. Tune's and Ray Train's folders (``search_*``,
    ``train_*``) stay remote only (Ray writes them there itself); the lock is remote only."""

    NOT_MIRRORED = ("search_*", "train_*", "driver.lock")
    NOT_PULLED = ("*/tb/*", "*/plots/*", "tb/*")       # views, not state: sent, never fetched

    def __init__(self, local: str, remote: str | None):
        super().__init__(local, remote, exclude=[f"{p}/*" for p in self.NOT_MIRRORED if "*" in p]
                         + [p for p in self.NOT_MIRRORED if "*" not in p])

    def pull(self) -> None:
        import fnmatch

        if self.remote is None:
            return
        remote = {rel: info for rel, info in list_files(self.remote).items()
                  if not any(fnmatch.fnmatch(rel, p) for p in self.exclude + self.NOT_PULLED)}
        for rel in remote:
            download_file(join(self.remote, rel), os.path.join(self.local, rel))
        for folder, _, files in os.walk(self.local):
            for name in files:
                rel = os.path.relpath(os.path.join(folder, name), self.local).replace(os.sep, "/")
                if rel not in remote and not any(fnmatch.fnmatch(rel, p) for p in self.NOT_PULLED):
                    os.unlink(os.path.join(folder, name))
        self.sent = {}
        for rel in remote:                  # what was fetched needs no sending back
            stat = os.stat(os.path.join(self.local, rel))
            self.sent[rel] = (stat.st_size, stat.st_mtime_ns)
        os.makedirs(self.local, exist_ok=True)


"""MXNet/insightface RecordIO (``train.rec`` + ``train.idx`` + ``property``), without mxnet.

Framing (dmlc-core recordio), little-endian: uint32 magic ``0xCED7230A``, uint32 ``lrec`` with
``cflag = lrec >> 29`` and ``length = lrec & (2**29 - 1)``, ``length`` payload bytes, zero
padding to a multiple of 4. A payload holding the magic word at a 4-byte aligned position is
stored as chunks (cflag 1 first, 2 middle, 3 last) with those magic words cut out; the reader
puts them back between consecutive chunks.

Payload (mxnet ``recordio.pack``): IRHeader ``<IfQQ`` (flag, label, id, id2); when flag > 0,
``flag`` float32 labels follow and replace ``label``. The rest is the encoded image.

insightface layout: record 0 has flag > 0 and label ``[a, b]``; keys 1..a-1 are images, keys
a..b-1 are one record per identity (skipped here). Record 0 with flag 0 means every key is an
image.
"""
from __future__ import annotations

import contextlib
import os
import struct
import threading
from typing import NamedTuple, Sequence

import numpy as np
import torch

from virface.data.images import decode_rgb, jpeg_bytes, png_bytes
from virface.data.sources import ImageSource, raw_class_ids, remap_labels
from virface.errors import DataError, RecordIOError
from virface.fileio import atomic_open, write_text_atomic

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
MAX_CHUNK_LENGTH = (1 << 29) - 1
_FRAME = struct.Struct("<II")
_IR_HEADER = struct.Struct("<IfQQ")
IR_HEADER_SIZE = _IR_HEADER.size  # 24

# Enough payload bytes for an IRHeader plus the two labels insightface records carry.
_HEADER_PREFIX = IR_HEADER_SIZE + 8


class IRHeader(NamedTuple):
    """``label`` is a float when ``flag == 0``, else a tuple of ``flag`` floats."""

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


def unpack(payload: bytes) -> tuple[IRHeader, bytes]:
    """Split a record payload into its IRHeader and the encoded image bytes."""
    if len(payload) < IR_HEADER_SIZE:
        raise RecordIOError(f"record payload of {len(payload)} bytes is shorter than the "
                            f"{IR_HEADER_SIZE}-byte IRHeader")
    flag, label, id1, id2 = _IR_HEADER.unpack_from(payload, 0)
    rest = IR_HEADER_SIZE
    if flag > 0:
        end = rest + 4 * flag
        if len(payload) < end:
            raise RecordIOError(f"IRHeader says {flag} float32 labels follow, but the payload "
                                f"has only {len(payload) - rest} bytes after the header")
        label = tuple(float(v) for v in struct.unpack_from(f"<{flag}f", payload, rest))
        rest = end
    return IRHeader(flag, label, id1, id2), bytes(payload[rest:])


def pack(header: IRHeader | Sequence, image_bytes: bytes) -> bytes:
    """Inverse of :func:`unpack`. As in mxnet, ``flag`` is derived from ``label``: 0 for a
    number, else the number of labels (which then follow the header as float32)."""
    header = IRHeader(*header)
    if isinstance(header.label, (int, float, np.integer, np.floating)):
        head = _IR_HEADER.pack(0, float(header.label), header.id, header.id2)
        return head + bytes(image_bytes)
    labels = np.asarray(header.label, dtype="<f4").reshape(-1)
    head = _IR_HEADER.pack(labels.size, 0.0, header.id, header.id2)
    return head + labels.tobytes() + bytes(image_bytes)


def encode_record(payload: bytes) -> bytes:
    """Frame one payload as dmlc's ``RecordIOWriter::WriteRecord`` does (chunks + padding)."""
    payload = bytes(payload)
    n = len(payload)
    if n > MAX_CHUNK_LENGTH:
        raise RecordIOError(f"record payload of {n} bytes exceeds the 2**29 - 1 byte limit")
    words = np.frombuffer(payload, dtype="<u4", count=n // 4)
    cuts = (np.flatnonzero(words == MAGIC) * 4).tolist()
    out = []
    start = 0
    for cut in cuts:
        out.append(_FRAME.pack(MAGIC, ((1 if start == 0 else 2) << 29) | (cut - start)))
        out.append(payload[start:cut])
        start = cut + 4
    out.append(_FRAME.pack(MAGIC, ((3 if cuts else 0) << 29) | (n - start)))
    out.append(payload[start:])
    # Earlier chunks have aligned lengths, so padding the whole payload pads the last chunk.
    out.append(b"\0" * (-n % 4))
    return b"".join(out)


def _read_index(idx_path: str) -> tuple[np.ndarray, np.ndarray]:
    keys, offsets = [], []
    with open(idx_path, "r", encoding="ascii", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != 2:
                    raise ValueError
                key, offset = int(fields[0]), int(fields[1])
                if offset < 0:
                    raise ValueError
            except ValueError:
                raise RecordIOError(f"{idx_path}:{line_no}: expected 'key<TAB>byte_offset', "
                                    f"got {line.strip()!r}") from None
            keys.append(key)
            offsets.append(offset)
    keys_arr = np.asarray(keys, dtype=np.int64)
    uniq, counts = np.unique(keys_arr, return_counts=True)
    if (counts > 1).any():
        dup = int(uniq[counts > 1][0])
        raise RecordIOError(f"{idx_path}: key {dup} appears {int(counts[counts > 1][0])} times")
    return keys_arr, np.asarray(offsets, dtype=np.int64)


def _pread(fd: int, n: int, offset: int, lock: threading.Lock) -> bytes:
    if hasattr(os, "pread"):  # positional read: no shared file position between threads
        return os.pread(fd, n, offset)
    with lock:  # pragma: no cover - Windows
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, n)


class RecordIOReader:
    """Random access to the records of a ``.rec`` file through its ``.idx``.

    Safe to share between threads and to pickle into DataLoader worker processes: the file is
    opened lazily in each process (the descriptor is never pickled and is reopened when
    ``os.getpid()`` changes, e.g. after a fork).
    """

    def __init__(self, rec_path: str, idx_path: str | None = None):
        self.rec_path = str(rec_path)
        self.idx_path = str(idx_path) if idx_path is not None \
            else os.path.splitext(self.rec_path)[0] + ".idx"
        if not os.path.isfile(self.rec_path):
            raise DataError(f"RecordIO file does not exist: {self.rec_path}")
        if not os.path.isfile(self.idx_path):
            raise DataError(f"RecordIO index does not exist: {self.idx_path} (needed to read "
                            f"{self.rec_path})")
        self._keys, self._offsets = _read_index(self.idx_path)
        # Most .idx files number keys 0..n-1 in order; then a key is its own row.
        self._dense = bool(np.array_equal(self._keys, np.arange(len(self._keys))))
        self._order = None if self._dense else np.argsort(self._keys, kind="stable")
        self._init_handle()

    def _init_handle(self) -> None:
        self._fd: int | None = None
        self._pid: int | None = None
        self._size = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_fd", "_pid", "_size", "_lock"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_handle()

    @property
    def keys(self) -> list[int]:
        """Record keys in ``.idx`` order (a new list on each access)."""
        return self._keys.tolist()

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: int) -> bool:
        return self._row_of(key) is not None

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._pid = None, None

    def __enter__(self) -> "RecordIOReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _handle(self) -> int:
        pid = os.getpid()
        if self._pid == pid:
            return self._fd
        if self._pid is not None:
            # Forked: the inherited lock may have been held by a parent thread, and the
            # inherited descriptor is this process's own copy, so close it and start afresh.
            self._lock = threading.Lock()
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd, self._pid = None, None
        with self._lock:
            if self._pid != pid:
                fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                self._size = os.fstat(fd).st_size
                self._fd, self._pid = fd, pid
        return self._fd

    def _row_of(self, key: int) -> int | None:
        key = int(key)
        if self._dense:
            return key if 0 <= key < len(self._keys) else None
        pos = int(np.searchsorted(self._keys, key, sorter=self._order))
        if pos < len(self._keys) and self._keys[self._order[pos]] == key:
            return int(self._order[pos])
        return None

    def offset_of(self, key: int) -> int:
        """Byte offset of record ``key`` in the ``.rec`` file."""
        row = self._row_of(key)
        if row is None:
            raise RecordIOError(f"{self.idx_path}: no record with key {key}")
        return int(self._offsets[row])

    def _chunk(self, fd: int, pos: int, key: int) -> tuple[int, bytes, int]:
        """Read one framed chunk at ``pos``: (cflag, data, position of the next frame)."""
        where = f"{self.rec_path}: record key {key}, byte offset {pos}"
        head = _pread(fd, _FRAME.size, pos, self._lock)
        if len(head) < _FRAME.size:
            if pos >= self._size:
                raise RecordIOError(f"{where}: offset is beyond the end of the file "
                                    f"({self._size} bytes)")
            raise RecordIOError(f"{where}: truncated record header ({len(head)} of "
                                f"{_FRAME.size} bytes before the end of the file)")
        magic, lrec = _FRAME.unpack(head)
        if magic != MAGIC:
            raise RecordIOError(f"{where}: bad magic 0x{magic:08X} (expected 0x{MAGIC:08X}); "
                                f"the .idx offset is wrong or the file is not RecordIO")
        cflag, length = lrec >> 29, lrec & MAX_CHUNK_LENGTH
        data = _pread(fd, length, pos + _FRAME.size, self._lock)
        if len(data) < length:
            raise RecordIOError(f"{where}: truncated record: header says {length} payload bytes, "
                                f"the file holds {len(data)}")
        return cflag, data, pos + _FRAME.size + length + (-length % 4)

    def read(self, key: int) -> bytes:
        """The payload of record ``key``, with chunked records reassembled."""
        fd = self._handle()
        start = self.offset_of(key)
        cflag, data, pos = self._chunk(fd, start, key)
        if cflag == 0:
            return data
        if cflag != 1:
            raise RecordIOError(f"{self.rec_path}: record key {key}, byte offset {start}: the "
                                f"record starts with cflag {cflag} (expected 0 or 1)")
        parts = [data]
        while cflag != 3:
            chunk_at = pos
            cflag, data, pos = self._chunk(fd, pos, key)
            if cflag not in (2, 3):
                raise RecordIOError(f"{self.rec_path}: record key {key}, byte offset {chunk_at}: "
                                    f"chunk with cflag {cflag} inside a chunked record "
                                    f"(expected 2 or 3)")
            parts.append(data)
        return MAGIC_BYTES.join(parts)

    def read_prefix(self, key: int, n: int) -> bytes:
        """At least the first ``n`` payload bytes of record ``key`` (all of it if shorter).

        One small read for the common unchunked record, so label scans skip the image bytes.
        """
        fd = self._handle()
        start = self.offset_of(key)
        head = _pread(fd, _FRAME.size + n, start, self._lock)
        if len(head) >= _FRAME.size:
            magic, lrec = _FRAME.unpack_from(head)
            length = lrec & MAX_CHUNK_LENGTH
            if magic == MAGIC and lrec >> 29 == 0 and len(head) - _FRAME.size >= min(n, length):
                return head[_FRAME.size:_FRAME.size + min(n, length)]
        return self.read(key)  # chunked or damaged: the full read reassembles or names the fault


class RecordIOWriter:
    """Writes ``.rec`` + ``.idx``; a context manager.

    Both files are written under temporary names and renamed into place on a clean ``close``,
    so an exception never leaves a half-written data set behind.
    """

    def __init__(self, rec_path: str, idx_path: str | None = None):
        self.rec_path = str(rec_path)
        self.idx_path = str(idx_path) if idx_path is not None \
            else os.path.splitext(self.rec_path)[0] + ".idx"
        # Both files go through fileio.atomic_open; the stack commits both on close, or
        # removes both temporary files when unwound by an error.
        with contextlib.ExitStack() as files:
            self._rec = files.enter_context(atomic_open(self.rec_path, "wb"))
            self._idx = files.enter_context(atomic_open(self.idx_path, "w"))
            self._files = files.pop_all()
        self._pos = 0
        self._keys: set[int] = set()
        self._closed = False

    def write(self, key: int, payload: bytes) -> None:
        """Append one record under integer ``key`` (unique within the file)."""
        if self._closed:
            raise RecordIOError(f"{self.rec_path}: write after close")
        key = int(key)
        if key in self._keys:
            raise RecordIOError(f"{self.rec_path}: key {key} written twice")
        framed = encode_record(payload)
        self._rec.write(framed)
        self._idx.write(f"{key}\t{self._pos}\n")
        self._keys.add(key)
        self._pos += len(framed)

    def close(self) -> None:
        """Finish and move both files into place."""
        if not self._closed:
            self._closed = True
            self._files.close()

    def abort(self) -> None:
        """Drop everything written; the target paths are left untouched."""
        if not self._closed:
            self._closed = True
            self._files.__exit__(RecordIOError, RecordIOError("aborted"), None)

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _read_property(path: str) -> tuple[int, tuple[int, int]]:
    with open(path, "r", encoding="utf-8") as f:
        text = f.read().strip()
    try:
        num_classes, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise DataError(f"{path}: expected 'num_classes,H,W', got {text!r}") from None
    return num_classes, (height, width)


class RecordIOSource:
    """An :class:`ImageSource` over an insightface ``train.rec``.

    ``labels`` (N,) int64 in [0, C), remapped from the records' raw class ids, which
    ``classes`` (C,) holds. ``image_size`` is ``(H, W)`` from the ``property`` file beside the
    ``.rec``, or None without one. Construction reads only the record headers.
    """

    def __init__(self, rec_path: str, idx_path: str | None = None, name: str | None = None):
        self.rec_path = str(rec_path)
        self.reader = RecordIOReader(rec_path, idx_path)
        folder = os.path.dirname(os.path.abspath(self.rec_path))
        self.name = name or os.path.basename(folder) or os.path.basename(self.rec_path)
        self.image_keys = self._image_keys()
        if len(self.image_keys) == 0:
            raise DataError(f"{self.rec_path}: no image records")
        raw = np.empty(len(self.image_keys), dtype=np.int64)
        for i, key in enumerate(self.image_keys.tolist()):
            raw[i] = self._raw_label(key)
        self.labels, self.classes = remap_labels(raw)
        self.num_classes = len(self.classes)
        self.property_path = os.path.join(folder, "property")
        self.image_size: tuple[int, int] | None = None
        self.property_num_classes: int | None = None
        if os.path.isfile(self.property_path):
            self.property_num_classes, self.image_size = _read_property(self.property_path)

    def _header(self, key: int) -> IRHeader:
        prefix = self.reader.read_prefix(key, _HEADER_PREFIX)
        flag = struct.unpack_from("<I", prefix)[0] if len(prefix) >= 4 else 0
        if IR_HEADER_SIZE + 4 * flag > len(prefix):
            prefix = self.reader.read_prefix(key, IR_HEADER_SIZE + 4 * flag)
        try:
            return unpack(prefix)[0]
        except RecordIOError as e:
            raise RecordIOError(f"{self.rec_path}: record key {key}: {e}") from None

    def _image_keys(self) -> np.ndarray:
        if 0 not in self.reader:
            return self.reader._keys.copy()
        header = self._header(0)
        if header.flag == 0:
            return self.reader._keys.copy()
        first_identity = int(header.label[0])
        keys = np.arange(1, first_identity, dtype=np.int64)
        missing = [int(k) for k in keys if k not in self.reader]
        if missing:
            raise RecordIOError(f"{self.rec_path}: record 0 says image keys are 1..."
                                f"{first_identity - 1}, but {len(missing)} are not in "
                                f"{self.reader.idx_path} (first: {missing[:5]})")
        return keys

    def _raw_label(self, key: int) -> int:
        header = self._header(key)
        label = header.label[0] if isinstance(header.label, tuple) else header.label
        if label != int(label):
            raise RecordIOError(f"{self.rec_path}: record key {key}: label {label} is not an "
                                f"integer class id")
        return int(label)

    def __len__(self) -> int:
        return len(self.image_keys)

    def read(self, index: int) -> torch.Tensor:
        """uint8 (3, H, W) RGB; ``CorruptImageError`` naming the file and key."""
        key = int(self.image_keys[index])
        _, image_bytes = unpack(self.reader.read(key))
        return decode_rgb(image_bytes, self.describe(index))

    def describe(self, index: int) -> str:
        return f"{self.rec_path} key {int(self.image_keys[index])}"


def _encoder(encode: str, quality: int):
    encode = encode.lower()
    if encode == "png":
        return png_bytes
    if encode in ("jpg", "jpeg"):
        return lambda img: jpeg_bytes(img, quality)
    raise DataError(f"unknown image encoding {encode!r}; use 'png' or 'jpeg'")


def write_recordio_source(source: ImageSource, out_dir: str, encode: str = "png",
                          quality: int = 95) -> str:
    """Write ``source`` as insightface ``out_dir/train.rec``, ``train.idx`` and ``property``.

    Images are grouped by label (stable sort) so each identity is one contiguous key range.
    Keys: 0 header (flag 2, label ``[N+1, N+1+C]``), 1..N images (label = raw class id as
    float), N+1..N+C identities (flag 2, label ``[first image key, one past last]``).
    Returns ``out_dir``.
    """
    n = len(source)
    if n == 0:
        raise DataError(f"{source.name}: nothing to write, the source is empty")
    to_bytes = _encoder(encode, quality)
    class_ids = raw_class_ids(source)
    if not np.array_equal(class_ids.astype(np.float32).astype(np.int64), class_ids):
        raise DataError(f"{source.name}: class ids beyond 2**24 cannot be stored exactly in the "
                        f"float32 RecordIO label")
    labels = np.asarray(source.labels, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    group_starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    group_ends = np.r_[group_starts[1:], n]
    n_identities = len(group_starts)
    first_identity_key = n + 1

    os.makedirs(out_dir, exist_ok=True)
    image_size = None
    with RecordIOWriter(os.path.join(out_dir, "train.rec"),
                        os.path.join(out_dir, "train.idx")) as writer:
        writer.write(0, pack(IRHeader(2, (first_identity_key, first_identity_key + n_identities),
                                      0, 0), b""))
        for key, index in enumerate(order.tolist(), start=1):
            image = source.read(index)
            if image_size is None:
                image_size = (int(image.shape[1]), int(image.shape[2]))
            writer.write(key, pack(IRHeader(0, float(class_ids[index]), key, 0),
                                   to_bytes(image)))
        for g, (start, end) in enumerate(zip(group_starts.tolist(), group_ends.tolist())):
            key = first_identity_key + g
            writer.write(key, pack(IRHeader(2, (start + 1, end + 1), key, 0), b""))
    write_text_atomic(os.path.join(out_dir, "property"),
                      f"{n_identities},{image_size[0]},{image_size[1]}\n")
    return out_dir

"""Exceptions the library raises. Each names the file, line, record or key at fault."""


class VirFaceError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(VirFaceError, ValueError):
    """A configuration value or key is invalid."""


class DataError(VirFaceError):
    """A data set cannot be read or built (missing files, bad format, empty split)."""


class CorruptImageError(DataError):
    """One image cannot be decoded; the loader may skip and count it."""


class RecordIOError(DataError):
    """A RecordIO file is malformed; the message names the file and byte offset."""


class PairSetError(DataError):
    """A verification pair set is malformed (odd image count, length mismatch, missing image)."""


class CheckpointError(VirFaceError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


class StagePreconditionError(VirFaceError):
    """A stage was started without what it needs from an earlier stage."""


class NonFiniteLossError(VirFaceError, FloatingPointError):
    """A loss became NaN or inf; the message names stage, epoch and step."""


class NonFiniteWeightsError(VirFaceError, FloatingPointError):
    """A weight or buffer became NaN or inf; the message names stage, epoch and tensor."""


class WriteError(VirFaceError, OSError):
    """A file could not be written (a full disk, a read-only folder); the message names it, and
    the file is left as it was."""

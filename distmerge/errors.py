"""One error hierarchy for distmerge.

Every error a user can cause is a :class:`DistmergeError`; each class also inherits the builtin
it resembles, so ``except FileNotFoundError`` keeps working for callers who do not know us.
Messages say what went wrong and how to fix it. The CLI maps these classes to exit codes in one
place (:mod:`distmerge.cli`); library code only raises.

All classes pickle by their message (``__reduce__``), so an error raised in a Ray actor reaches
the driver as the same class with the same text.
"""

from __future__ import annotations


class DistmergeError(Exception):
    """Base class of every error distmerge raises on purpose."""

    exit_code = 1
    # whether another worker may succeed where this one failed (the engine's retry policy)
    retryable = False

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):
        return (type(self), (self.message,))

    def __str__(self) -> str:
        return self.message


class ConfigError(DistmergeError, ValueError):
    """The pipeline file or a CLI flag is wrong (unknown key, wrong type, impossible value)."""

    exit_code = 2


class SourceNotFoundError(DistmergeError, FileNotFoundError):
    """A model folder, shard or index file named by the pipeline does not exist."""

    exit_code = 3


class UnsafeCheckpointError(DistmergeError, ValueError):
    """A checkpoint is refused before any tensor byte is read: pickle files, corrupt or hostile
    safetensors headers, index files pointing outside the model folder."""

    exit_code = 4


class IncompatibleModelsError(DistmergeError, ValueError):
    """Base and experts do not share tensor names, shapes or dtypes."""

    exit_code = 5


class DestinationError(DistmergeError, FileExistsError):
    """The output location cannot be used: it exists (without ``overwrite``), or lies inside a
    source."""

    exit_code = 6


class NonFiniteError(DistmergeError, ValueError):
    """An input tensor holds NaN or Inf values."""

    exit_code = 7


class MergeFailedError(DistmergeError, RuntimeError):
    """The run failed while merging (a slice failed beyond its retries, a verification failed).
    The destination is left as it was."""

    exit_code = 8


class AccessDeniedError(DistmergeError, PermissionError):
    """The store refused a request (HTTP 401/403: no permission, wrong or expired credentials).
    Exit code 3, like a missing source: the run cannot read one of its inputs."""

    exit_code = 3


class StorageUnavailableError(DistmergeError, OSError):
    """Transient storage failures (5xx, timeouts, resets) outlasted every attempt. Retryable:
    the engine may still give the slice to another worker."""

    exit_code = 9
    retryable = True


class ClusterError(DistmergeError, ConnectionError):
    """The Ray cluster's job server cannot be reached (nothing listens, DNS, timeout, the
    connection was lost), what answers is not a Ray job server, or it refused the job."""

    exit_code = 10

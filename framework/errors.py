"""The framework's error types, in one leaf module that every package may import.

User mistakes (`ConfigError`, `DataError`, `ShapeError`) carry one line naming the key, path or
layer; scripts print that line and exit with status 2. Run failures the user did not type
(`CheckpointError`, `NonFiniteError`, `DistributedError`, and a full disk, a read-only file
system or a denied permission) exit with status 1. `OutOfMemoryError` (XLA could not allocate
the step on the device) exits with status 3 after its multi-line report."""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence

# OS errors about a path the user typed; any other (disk full, read-only file system, permission
# denied, an immutable directory, I/O errors) is a failure of the environment.
PATH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG})


class _OneLine(Exception):
    """An exception whose message is collapsed onto one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        """The one-line message (no prefix), for callers that format it themselves."""
        return self.args[0]


class ConfigError(_OneLine):
    """A user mistake in a config file or override: one line, shown without a traceback."""


class DataError(_OneLine, ValueError):
    """A data problem the user can fix (missing path, corpus too small): one line, no trace."""


class CheckpointError(_OneLine, RuntimeError):
    """Checkpoints exist but none can be restored: never silently start from scratch."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files cannot be read or no longer match their checksums."""


class NonFiniteError(_OneLine, RuntimeError):
    """Loss, a gradient or a parameter became NaN/inf; the message names the step and leaf."""


class DistributedError(_OneLine, RuntimeError):
    """The processes of a multi-process run could not connect, or lost one another."""


class OutOfMemoryError(RuntimeError):
    """XLA could not allocate the train step: `details` (framework.train.oom.Report) names the
    device, the step's need and the largest buffers by layer; `report` is its text without
    the estimator's advice (scripts/train.py adds that)."""

    def __init__(self, details):
        self.details = details
        self.report = details.render()
        super().__init__(self.report)


class ShapeError(ValueError):
    """A wrong input shape or dtype; `path` lists the layer scopes from outermost to innermost."""

    def __init__(self, message: str, path: Sequence[str] = ()):
        self.message = message
        self.path = list(path)
        super().__init__(self._render())

    def _render(self) -> str:
        where = "/".join(self.path) or "<root>"
        return f"{where}: {self.message}"

    def with_prefix(self, name: str) -> ShapeError:
        """Prepend an enclosing scope's name (called as the error leaves each scope)."""
        self.path.insert(0, name)
        self.args = (self._render(),)
        return self


def environment_cause(e: BaseException) -> tuple[BaseException, int] | None:
    """(cause, OS error code) of a disk or file-system failure anywhere in the exception's
    chain, path mistakes (PATH_ERRNOS) left out. Orbax and tensorstore bury these several
    exceptions deep, tensorstore only in its message (`[os_error_code='28']`)."""
    seen: list[BaseException] = []
    cause: BaseException | None = e
    while cause is not None and cause not in seen:
        seen.append(cause)
        code = getattr(cause, "errno", None)
        if code is None and (match := re.search(r"os_error_code='(\d+)'", str(cause))):
            code = int(match.group(1))
        if code is not None and code not in PATH_ERRNOS:
            return cause, code
        cause = cause.__cause__ or cause.__context__
    return None

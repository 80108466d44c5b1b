"""Writing files so that nothing is lost or left half-made: every file the project writes
(checkpoints, images, reports, plots, ONNX models, downloads) goes through `atomic_write`, every
folder a command makes through `removed_if_left_empty`, and every failure ends in one line,
"cannot write [ROLE ]PATH: reason"."""

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from utils import UserError


def cannot_write(path: Path, reason: object, role: str = "") -> UserError:
    """The one wording of a failed write; `reason` an OSError (its strerror is shown) or a text."""
    reason = getattr(reason, "strerror", None) or reason
    return UserError(f"cannot write {role + ' ' if role else ''}{path}: {reason}")


def check_writable(path: Path, role: str) -> None:
    """Refuse, in one line and before any work, a `role` at `path` (a file, or a folder to be made)
    that could not be written: the nearest existing part of the path is a file, or may not be written."""
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if existing != path and not existing.is_dir():
        raise cannot_write(path, f"{existing} is a file, not a folder", role)
    if not os.access(existing, os.W_OK):
        raise cannot_write(path, f"{existing} is not writable", role)


def writable_folder(folder: Path, role: str) -> None:
    """Make `folder` if missing; refuse, in one line, one that cannot be written to."""
    check_writable(folder, role)
    if folder.exists() and not folder.is_dir():
        raise cannot_write(folder, "it is a file, not a folder", role)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise cannot_write(folder, err, role) from None


@contextlib.contextmanager
def removed_if_left_empty(folder: Path) -> Iterator[None]:
    """The folders on the way to `folder` that do not exist yet are removed again if the block
    fails and leaves them empty: a command that fails before its first file leaves nothing behind."""
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        yield
    except BaseException:
        for path in missing:  # the deepest first; rmdir removes only empty folders
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: Path, role: str = "") -> Iterator[BinaryIO]:
    """A binary file to write `path` through: a temporary file in the same folder, fsynced and
    renamed over `path` when the block ends without an error, removed when it raises. A crash at
    any moment leaves the old file or the new one, never a partial file. The folder is made if
    missing; OSErrors, the block's included, end in one line (cannot_write)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise cannot_write(path, err, role) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; the result is an ordinary file
        os.replace(tmp, path)
    except OSError as err:
        raise cannot_write(path, err, role) from None
    finally:
        Path(tmp).unlink(missing_ok=True)

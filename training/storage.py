"""Disk faults in words: a full disk or a folder that can't be written, told from an error or found by looking.

The trainer explains the error that stopped it (`explain_os_error`); the web worker looks at the run folder
before a run starts and when a trainer exits without saying why (`folder_problem`). Libraries wrap the
operating system's error in their own (safetensors: "No space left on device (os error 28)"; torch's zip
writer: "file write failed", with no errno at all), so the causes and the message are read, then the disk.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
# What wrapped errors say (Rust's "os error N", C's strerror) when no errno travels with them.
NO_SPACE_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
NOT_WRITABLE_TEXT = ("read-only file system", "os error 30")


def free_mb(path: Path) -> int:
    """Free space, in MB, on the disk that holds `path` (its nearest existing folder)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free // 2**20


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _where(exc: BaseException, run_dir: Path) -> str:
    filename = getattr(exc, "filename", None)
    if not filename:
        return ""
    path = Path(filename)
    try:
        return f" writing {path.resolve().relative_to(Path(run_dir).resolve())}"
    except ValueError:
        return f" writing {path}"


def no_space_message(run_dir: Path, where: str = "") -> str:
    return (
        f"no space left on the disk of the run folder{where} ({free_mb(run_dir)} MB free now): "
        "free some space, then resume or rerun it"
    )


def explain_os_error(exc: BaseException, run_dir: Path) -> str | None:
    """A full disk or a folder that can't be written, said so, if that is what `exc` (or its cause) is."""
    for cause in _chain(exc):
        code = cause.errno if isinstance(cause, OSError) else None
        text = str(cause).lower()
        if code in NO_SPACE or any(t in text for t in NO_SPACE_TEXT):
            return no_space_message(run_dir, _where(cause, run_dir))
        if code == errno.EROFS or any(t in text for t in NOT_WRITABLE_TEXT):
            return f"run folder not writable (read-only file system){_where(cause, run_dir)}"
        if code in NOT_WRITABLE and getattr(cause, "filename", None):
            return f"run folder not writable ({cause.strerror.lower()}){_where(cause, run_dir)}"
    return None


def folder_problem(folder: Path, min_free_mb: int = 0) -> str | None:
    """What stops a run from writing in `folder`: it can't be written (tried with a real file, since
    permissions say nothing for root, a read-only mount or an immutable folder), or its disk has less than
    `min_free_mb` free. None when it is fine."""
    folder = Path(folder)
    probe = folder / f".write-test-{uuid.uuid4().hex[:8]}"
    try:
        with probe.open("wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        try:
            probe.unlink(missing_ok=True)
        except OSError:  # the folder is no folder, or refuses even that
            pass
        if exc.errno in NO_SPACE:
            return f"no space left on the data dir ({free_mb(folder)} MB free): free some space, then run it again"
        return f"run folder not writable ({exc.strerror.lower()}): {folder}"
    free = free_mb(folder)
    if free < min_free_mb:
        return (
            f"no space left on the data dir ({free} MB free; a run needs at least {min_free_mb} MB, "
            "TRAINYARD_MIN_FREE_MB): free some space, then run it again"
        )
    return None

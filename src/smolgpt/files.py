"""Crash-safe files: atomic writes, the user cache directory, and one-run-per-directory locks.

Every file smolgpt writes that a later run reads (checkpoints, token caches, downloads) goes
through :func:`atomic_write`: the bytes go to a temporary file in the same directory, are
flushed and fsync'ed, and the temporary file is renamed over the target. A rename within one
directory is atomic, so a reader (or a process killed at any instant) sees either the old
complete file or the new complete file, never a mixture.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional

from .errors import SmolGPTError


def cache_dir() -> Path:
    """Where token caches and downloaded corpora live: $SMOLGPT_CACHE_DIR, else the XDG cache."""
    if os.environ.get("SMOLGPT_CACHE_DIR"):
        return Path(os.environ["SMOLGPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smolgpt"


def umask() -> int:
    """The process's umask: from /proc on Linux, elsewhere by setting it and back (no call
    only reads it, and setting it briefly could change a file another thread creates)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    """The permissions a replaced file keeps, or those open() gives a new file (0o666 less
    the umask): mkstemp's temporary file is readable by its owner alone."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return 0o666 & ~umask()


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not possible (or needed) on every platform.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_failure(exc: BaseException) -> Optional[str]:
    """Why a write failed, if it was the file system's doing (None for anything else)."""
    # torch.save may wrap the OSError, or fail again while closing the file after it: look
    # down the chain of causes and contexts.
    seen, link = set(), exc
    while link is not None and id(link) not in seen:
        if isinstance(link, OSError):
            return "disk full" if link.errno == errno.ENOSPC else link.strerror
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    if isinstance(exc, RuntimeError) and "file write failed" in str(exc):
        return "disk full?"  # torch.save reports a failed write as a RuntimeError
    return None


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(file) on a temporary file, then atomically replace path with it.

    The file gets the permissions of the one it replaces, or a new file's (as open() would
    give it). On any failure (a full disk included) the temporary file is removed, path
    keeps its previous content, and a SmolGPTError says what happened.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp_name, _new_file_mode(path))
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        reason = _write_failure(exc)
        if reason is None:
            raise
        kept = "the previous version is kept" if path.exists() else "nothing was written"
        raise SmolGPTError(f"could not write {path} ({reason}); {kept}") from exc
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


class RunLock:
    """An exclusive lock on a run directory, held for the life of a training process.

    It is an OS-level advisory lock (flock) on ``<dir>/.lock``: the kernel drops it when the
    process dies, however it dies, so a crash never leaves a directory locked.
    """

    FILE = ".lock"

    def __init__(self, directory: Path):
        self.path = Path(directory) / self.FILE
        self._file = None

    def acquire(self) -> "RunLock":
        self._file = open(self.path, "a+")
        try:
            _lock_file(self._file)
        except OSError:
            self._file.close()
            self._file = None
            raise SmolGPTError(
                f"{self.path.parent} is in use by another training process; "
                "wait for it to finish or choose another --out_dir"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the lock
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_file(f) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def ensure_writable_dir(path: Path) -> Path:
    """Create path if needed and check it is a writable directory, before any work starts."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SmolGPTError(f"--out_dir {path} is a file, not a directory: choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.TemporaryFile(dir=path)
        probe.close()
    except OSError as exc:
        raise SmolGPTError(
            f"cannot write to run directory {path} ({exc.strerror}): choose another --out_dir"
        ) from None
    return path


# Byte-order marks and the codecs that read (and drop) them. UTF-32's come first: the
# UTF-32-LE mark begins with the UTF-16-LE one.
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def file_encoding(path: Path, encoding: str) -> str:
    """The codec that reads path: the one its byte-order mark names, else encoding."""
    with open(path, "rb") as f:
        head = f.read(4)
    for mark, codec in BYTE_ORDER_MARKS:
        if head.startswith(mark):
            return codec
    return encoding


def read_user_text(path: Path, where: str) -> str:
    """The text of a small file a user named (where: how to name it in a message, e.g.
    "--config run.toml"): UTF-8, or what its byte-order mark says. Any problem is a
    SmolGPTError saying what to do."""
    try:
        return path.read_text(encoding=file_encoding(path, "utf-8"))
    except FileNotFoundError:
        raise SmolGPTError(f"{where} does not exist: check the path") from None
    except IsADirectoryError:
        raise SmolGPTError(f"{where} is a directory: give a file") from None
    except UnicodeDecodeError:
        raise SmolGPTError(f"{where} is not UTF-8 text: save it as UTF-8") from None
    except OSError as exc:
        raise SmolGPTError(f"cannot read {where} ({exc.strerror})") from None

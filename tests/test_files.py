"""Crash-safe files: atomic writes, run-directory locks, the cache directory."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from smolgpt.errors import SmolGPTError
from smolgpt.files import RunLock, atomic_write, atomic_write_text, cache_dir, ensure_writable_dir

from e2e import names


def leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


# --------------------------------------------------------------------------- atomic_write


def test_atomic_write_creates_and_replaces(tmp_path):
    path = tmp_path / "deep" / "er" / "file.bin"
    atomic_write(path, lambda f: f.write(b"first"))
    assert path.read_bytes() == b"first"
    atomic_write(path, lambda f: f.write(b"second, longer content"))
    assert path.read_bytes() == b"second, longer content"
    atomic_write_text(path, "ünïcode ✓\n")
    assert path.read_text(encoding="utf-8") == "ünïcode ✓\n"
    assert leftovers(path.parent, {"file.bin"}) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_atomic_write_gives_the_permissions_open_would(tmp_path):
    """Not the owner-only 0600 of the temporary file: others may read a checkpoint or a
    picture as they may any file the user makes; a replaced file keeps its own mode."""
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "new.txt", "a")
        assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "a")
        assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600
        os.chmod(tmp_path / "new.txt", 0o640)
        atomic_write_text(tmp_path / "new.txt", "b")
        assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
    path = tmp_path / "file.txt"
    path.write_bytes(b"old content")

    def fails_halfway(f):
        f.write(b"new partial")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        atomic_write(path, fails_halfway)
    assert path.read_bytes() == b"old content"
    assert leftovers(tmp_path, {"file.txt"}) == []


def test_failed_write_of_new_file_leaves_nothing(tmp_path):
    def fails(f):
        f.write(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.txt", fails)
    assert leftovers(tmp_path, set()) == []


@pytest.mark.parametrize(
    "error, reason",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "disk full"),
        (OSError(errno.EIO, "Input/output error"), "Input/output error"),
    ],
)
def test_os_errors_become_smolgpt_errors(tmp_path, error, reason):
    path = tmp_path / "file.txt"
    path.write_bytes(b"old")

    def fails(f):
        raise error

    # The file, why, and what became of it: the old version kept, or nothing written.
    with pytest.raises(SmolGPTError, match=names(str(path), reason, "kept")):
        atomic_write(path, fails)
    assert path.read_bytes() == b"old"
    assert leftovers(tmp_path, {"file.txt"}) == []
    with pytest.raises(SmolGPTError, match=names(str(tmp_path / "other.txt"), reason, "nothing")):
        atomic_write(tmp_path / "other.txt", fails)
    assert leftovers(tmp_path, {"file.txt"}) == []


def test_atomic_write_into_a_file_path_fails_cleanly(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("I am a file")
    with pytest.raises(OSError):
        atomic_write(blocker / "child.txt", lambda f: f.write(b"x"))
    assert blocker.read_text() == "I am a file"


# --------------------------------------------------------------------------- RunLock


def test_run_lock_is_exclusive_until_released(tmp_path):
    first = RunLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(SmolGPTError, match=names(str(tmp_path), "in use", "--out_dir")):
        RunLock(tmp_path).acquire()
    first.release()
    second = RunLock(tmp_path).acquire()  # free again
    second.release()
    second.release()  # releasing twice is harmless


def test_run_lock_context_manager(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(SmolGPTError):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):
        pass


def test_run_locks_on_different_directories_are_independent(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with RunLock(tmp_path / "a"), RunLock(tmp_path / "b"):
        pass


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_lock_of_killed_process_is_free(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from smolgpt.files import RunLock
            lock = RunLock({str(tmp_path)!r}).acquire()  # (kept referenced: held)
            print("locked", flush=True)
            time.sleep(120)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert (tmp_path / ".lock").read_text().strip() == str(holder.pid)
        with pytest.raises(SmolGPTError, match=names(str(tmp_path), "in use")):
            RunLock(tmp_path).acquire()
        os.kill(holder.pid, signal.SIGKILL)
        assert holder.wait(timeout=30) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()
    with RunLock(tmp_path):  # the kernel released the dead process's lock
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"


# --------------------------------------------------------------------------- directories


def test_ensure_writable_dir_creates_nested(tmp_path):
    path = tmp_path / "runs" / "one"
    assert ensure_writable_dir(path) == path
    assert path.is_dir()
    assert list(path.iterdir()) == []  # the probe left nothing behind
    assert ensure_writable_dir(path) == path  # existing directory is fine


def test_ensure_writable_dir_on_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(SmolGPTError, match=names(str(path), "--out_dir")) as err:
        ensure_writable_dir(path)
    assert "a file" in str(err.value).replace(str(path), "")  # not only in the path
    # The system's reason, below the file.
    with pytest.raises(
        SmolGPTError, match=names(str(path / "below"), "--out_dir", os.strerror(errno.ENOTDIR))
    ):
        ensure_writable_dir(path / "below")


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root can write into read-only directories",
)
def test_ensure_writable_dir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(
            SmolGPTError, match=names(str(ro), "--out_dir", os.strerror(errno.EACCES))
        ):
            ensure_writable_dir(ro)
    finally:
        ro.chmod(0o700)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SMOLGPT_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SMOLGPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "smolgpt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "smolgpt"


def test_tests_never_use_the_real_cache(isolated_cache):
    assert cache_dir() == isolated_cache
    assert Path.home() / ".cache" not in cache_dir().parents

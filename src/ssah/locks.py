"""Folder locks: the exclusive right of one process to write one run folder (see :class:`FolderLock`).

The lock is ``flock`` on ``.<name>.lock`` beside the folder, opened without following a symbolic link (a link or a
folder at that path is refused in one line, never followed and overwritten); a process may take the same lock
twice (a command takes it at its start, its run folder again when it writes), and the last holder releases it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ssah.errors import UserError

try:  # POSIX; without it (Windows) FolderLock falls back to an O_EXCL file holding the PID
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["FolderLock", "check_lock_path", "lock_holder", "lock_path"]


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def lock_path(out: str | os.PathLike[str]) -> Path:
    """The lock file of a run folder: ``.<name>.lock`` beside it (inside it would be moved with the folder)."""
    out = Path(out)
    return out.parent / f".{out.name}.lock"


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def check_lock_path(path: Path) -> None:
    """Refuse a lock path that is a symbolic link (it would be followed and its target overwritten with a PID)
    or anything but a regular file (a folder, a pipe), in one line."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"cannot check the lock file {path} ({exc.strerror}): check its folder's permissions") from None
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"the lock file {path} is a symbolic link: remove it (ssah never follows a lock link)")
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise UserError(f"the lock file {path} is {kind}: remove it, or choose another --out")


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# locks this process holds: lock path -> [pid, descriptor, holders]; a command takes its folder's lock at its
# start and the run folder takes it again when it writes (the same descriptor, released by the last holder)
_HELD: dict[str, list[int]] = {}


def _open_lock(path: Path, flags: int) -> int:
    """Open a lock file without following a link; a one-line ``UserError`` for a link, a folder or no access."""
    check_lock_path(path)
    try:
        return os.open(path, flags | _NOFOLLOW, 0o644)
    except OSError as exc:
        check_lock_path(path)  # replaced by a link or a folder meanwhile: say so
        raise UserError(f"cannot open the lock file {path} ({exc.strerror}): check the --out folder's parent") from None


def lock_holder(out: str | os.PathLike[str]) -> int | None:
    """The process id of a live run that holds the lock of ``out`` (None when nobody does); writes nothing."""
    path = lock_path(out)
    check_lock_path(path)
    if not path.is_file():
        return None
    if fcntl is None:  # no flock: trust the PID written into the file
        pid = _read_pid(path)
        return pid if pid is not None and pid != os.getpid() and _pid_alive(pid) else None
    if _held(path) is not None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = _read_pid(path)
        return None if pid == os.getpid() else (pid or -1)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _lock_key(path: Path) -> str:
    return os.path.join(os.path.realpath(path.parent), path.name)


def _held(path: Path) -> list[int] | None:
    """This process's entry for a lock it holds (none inherited through fork)."""
    entry = _HELD.get(_lock_key(path))
    return entry if entry is not None and entry[0] == os.getpid() else None


class FolderLock:
    """Exclusive right to write one run folder (and its staging folders), held by one process.

    The lock is ``flock`` on ``.<name>.lock`` beside the folder, holding the owner's PID for messages. The kernel
    releases it when the process dies however it dies (kill -9 included), so a lock is never stale and holding it
    proves that whoever left a staging folder of this run behind is gone. The file is removed on release; the
    inode check after locking makes a process that opened the file just before its removal try again, instead of
    locking a file nobody else sees. Where ``fcntl`` is missing (Windows) the file is created with ``O_EXCL`` and
    a file whose PID is no longer running is taken over.
    """

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Path(out)
        self.path = lock_path(self.out)
        self.fd: int | None = None

    def _busy(self, pid: int | None) -> UserError:
        who = f"(PID {pid}) " if pid and pid > 0 else ""
        return UserError(f"another ssah run {who}is writing {self.out}: wait for it to finish or choose another --out")

    def acquire(self) -> FolderLock:
        """Take the lock or raise a ``UserError`` naming the process that holds it."""
        if self.fd is not None:
            return self
        held = _held(self.path)
        if held is not None:  # taken earlier by this process (the command's start): share it
            held[2] += 1
            self.fd = held[1]
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            self._acquire_excl()
        else:
            self._acquire_flock()
        assert self.fd is not None
        _HELD[_lock_key(self.path)] = [os.getpid(), self.fd, 1]
        return self

    def _acquire_flock(self) -> FolderLock:
        for _ in range(100):
            fd = _open_lock(self.path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._busy(_read_pid(self.path)) from None
            try:
                same = os.lstat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released and removed by its previous holder between our open and flock
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return self
        raise self._busy(None)

    def _acquire_excl(self) -> FolderLock:
        for _ in range(2):
            try:
                fd = _open_lock(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            except UserError:
                if not self.path.is_file():
                    raise
                pid = _read_pid(self.path)
                if pid is not None and _pid_alive(pid):
                    raise self._busy(pid) from None
                self.path.unlink(missing_ok=True)  # its process is gone
                continue
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return self
        raise self._busy(None)

    def owned(self) -> bool:
        """Whether this process still holds the lock (the file at the path is the one it locked)."""
        if self.fd is None:
            return False
        try:
            return os.lstat(self.path).st_ino == os.fstat(self.fd).st_ino
        except OSError:
            return False

    def release(self) -> None:
        if self.fd is None:
            return
        held = _held(self.path)
        if held is not None and held[1] == self.fd:
            held[2] -= 1
            if held[2] > 0:  # another holder in this process keeps it
                self.fd = None
                return
            del _HELD[_lock_key(self.path)]
        if self.owned():
            self.path.unlink(missing_ok=True)
        os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = None

"""The lock that keeps two fedleak processes out of one run (or sweep) directory."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

from fedleak.report.rundir import LOCK_FILE, RunDirectoryError


class RunLock:
    """An exclusive lock on a run directory, held by one process from start to exit.

    The lock is `flock` on `.fedleak.lock`, which also records the holder's PID, host and start
    time for the refusal message. The kernel drops it when the holder exits, however it exits
    (crash, kill -9), so a dead run never leaves a stale lock behind. Where the file system
    offers no `flock`, the recorded PID decides: a lock whose process is gone (on this host) is
    stale and taken over. Re-entrant within one process (`fedleak run` takes it before Ray
    starts, the ServerApp again when the run begins).
    """

    _held: ClassVar[dict[Path, tuple[int, int | None]]] = {}

    def __init__(
        self, path: Path, instead: str = "choose another out-dir", file_name: str = LOCK_FILE
    ) -> None:
        self.path = Path(path).resolve()
        self.file = self.path / file_name
        self.instead = instead  # what a refused user can do besides waiting

    def holder(self) -> str | None:
        """Who holds the lock when another process does (PID, host, start), else None;
        creates nothing."""
        if self.path in self._held or not self.file.is_file():
            return None
        try:
            fd = os.open(self.file, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None  # unreadable, a link or gone: `acquire` will say what is wrong
        try:
            _flock(fd)
        except BlockingIOError:
            return _describe_holder(self.file)
        except OSError:
            pass  # no flock here: `acquire` falls back to the recorded PID
        finally:
            os.close(fd)  # closing drops a lock taken just now
        return None

    def probe(self) -> None:
        """Raise `RunDirectoryError` if another process holds the lock; creates nothing."""
        holder = self.holder()
        if holder is not None:
            raise _in_use(self.path, holder, self.instead)

    def acquire(self) -> RunLock:
        """Take the lock or raise `RunDirectoryError` naming the process that holds it."""
        if self.path in self._held:
            count, fd = self._held[self.path]
            self._held[self.path] = (count + 1, fd)
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        fd = self._open_lock_file()
        try:
            _flock(fd)
        except BlockingIOError:
            holder = _describe_holder(self.file)
            os.close(fd)
            raise _in_use(self.path, holder, self.instead) from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            _check_pid_lock(self.file, self.path, fd, self.instead)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode("utf-8"), 0)
        self._held[self.path] = (1, fd)
        return self

    def _open_lock_file(self) -> int:
        """The lock file, opened without following a link: it is truncated and written, and a
        run folder from elsewhere could hold a link to any file of the user's."""
        try:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as error:
            kind = "a symbolic link" if error.errno == errno.ELOOP else error.strerror
            raise RunDirectoryError(
                f"{self.file}: {kind}; expected fedleak's lock file (remove it)"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunDirectoryError(
                f"{self.file}: not a regular file; expected fedleak's lock file"
            )
        return fd

    def release(self) -> None:
        """Release one acquisition; the last one empties the file and drops the lock."""
        count, fd = self._held.get(self.path, (0, None))
        if count > 1:
            self._held[self.path] = (count - 1, fd)
            return
        self._held.pop(self.path, None)
        if fd is not None:
            # Emptied, not deleted: deleting would let a waiting process lock a dead inode.
            os.ftruncate(fd, 0)
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()


def _flock(fd: int) -> None:
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _holder() -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _read_holder(file: Path) -> dict[str, object]:
    try:
        holder = json.loads(file.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError, RecursionError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe_holder(file: Path) -> str:
    holder = _read_holder(file)
    if "pid" not in holder:
        return "process unknown"
    return f"process {holder['pid']} on {holder.get('host', '?')} since {holder.get('since', '?')}"


def _check_pid_lock(file: Path, path: Path, fd: int, instead: str) -> None:
    """The fallback without flock: refuse while the recorded process lives (on this host)."""
    holder = _read_holder(file)
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return
    if holder.get("host") != socket.gethostname():
        os.close(fd)
        raise RunDirectoryError(
            f"{path}: in use by another fedleak run ({_describe_holder(file)}) on another host; "
            f"delete {file} if that run is gone"
        )
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return  # stale: its process is gone
    except PermissionError:
        pass  # alive, owned by someone else
    os.close(fd)
    raise _in_use(path, _describe_holder(file), instead)


def _in_use(path: Path, holder: str, instead: str) -> RunDirectoryError:
    """The refusal of a folder another live fedleak run holds."""
    return RunDirectoryError(
        f"{path}: in use by another fedleak run ({holder}); wait for it to end or {instead}"
    )

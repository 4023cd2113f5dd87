"""One writer per output folder: an exclusive lock with the holder's pid and host, released on exit.

``with RunLock(folder):`` creates the folder if needed and takes ``folder/.xmcl.lock``: an advisory ``flock`` held
for as long as the lock is, on a file that records the holder (pid, host, start time, command line). A second
process asking for the same folder fails at once with ``RunFolderError`` naming the folder and the holder. The
kernel drops a ``flock`` when its process dies, even by ``kill -9``, so a lock file left by a dead process is
detected as stale and taken over (``stale_holder`` says whose it was). On release the lock file is removed, and
so is the folder itself when this lock created it and nothing else was written there (a run that failed at its
start leaves no empty folder behind). Leftover temporaries of writes killed mid-way are cleared on acquisition.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from xmcl.errors import RunFolderError
from xmcl.runtime.files import check_output_dir, remove_stale_temporaries

LOCK_NAME = ".xmcl.lock"


def describe_holder(record: dict) -> str:
    """``pid 123 on host h since 2024-05-01 10:00:00 (xmcl train ...)`` from a lock record."""
    started = record.get("started")
    since = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    command = f" ({record['command']})" if record.get("command") else ""
    return f"pid {record.get('pid', '?')} on host {record.get('host', '?')}{since}{command}"


class RunLock:
    """The exclusive lock of ``folder`` (see the module docstring); ``what`` names the folder in messages."""

    def __init__(self, folder: Path | str, what: str = "run folder") -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self.stale_holder: dict | None = None
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> "RunLock":
        """Take the lock or raise ``RunFolderError`` naming its holder; the folder is created when missing."""
        check_output_dir(self.folder, self.what)
        self._created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            return self._take()
        except OSError as error:
            raise RunFolderError(f"{self.what} {self.folder}: cannot take its lock ({error.strerror or error})") \
                from None

    def _take(self) -> "RunLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_record(fd)
                os.close(fd)
                raise RunFolderError(f"{self.what} {self.folder} is in use by {describe_holder(holder)}"
                                     f"{_liveness(holder)}; wait for it to finish or stop it, or use another "
                                     f"folder") from None
            try:  # the file may have been removed (a holder releasing) between our open and our lock: retry
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.stale_holder = _read_record(fd) or None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        remove_stale_temporaries(self.folder)
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (and the folder, when this lock made it and it stayed empty)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._created:
            try:
                self.folder.rmdir()  # only succeeds when empty
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _liveness(record: dict) -> str:
    """A note when the recorded holder is a process of this host that no longer runs (its children, such as
    data-loading workers, still hold the lock until they exit)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return ""
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return ", which has exited (processes it started still hold the lock)"
    except PermissionError:
        pass
    return ""


def _read_record(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}

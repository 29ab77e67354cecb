"""One writer per output folder: an exclusive ``flock`` on a lock file inside it, naming its holder.

Two jobs writing the same cache or training folder at once interleave their files and both report
success, so a writer takes the folder's lock for the whole job and a second writer is refused at
once, with a message naming the holder (pid, host, command, start time) recorded in the lock file.
The lock is the kernel's ``flock`` on the open file, not the file's existence: it is released when
the holder exits for any reason, ``kill -9`` included, so a lock file left behind never blocks a
later job. The processes of one sharded job (``fusion_diff.utils.sharding``) write side by side
under the lock their main process holds. ``flock`` works on local disks and on NFS (Linux emulates
it there with POSIX locks).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from fusion_diff.errors import FolderInUseError

LOCK_FILE = ".fusion-diff.lock"


@contextlib.contextmanager
def exclusive_folder(folder: str | os.PathLike, job: str) -> Iterator[Path]:
    """Hold ``folder``'s writer lock for the block (``job`` says what writes it, for the holder record).

    Raises ``FolderInUseError`` naming the holder when another live process holds it. The folder is
    created if needed (and removed again if the block wrote nothing into it); the lock file stays (its
    presence means nothing, only a held ``flock`` does).
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUseError(
                f"{folder} is being written by another {job}: {_describe_holder(path)}. Wait for that job to "
                f"finish (or stop it), or write to another folder. The lock in {path} is released as soon as its "
                "holder exits, even when it is killed, so this holder is still running."
            ) from None
        locked = True
        record = {
            "job": job,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(sys.argv),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        yield folder
    finally:
        if locked and created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            _remove_empty(folder, path)  # a job that failed before writing anything leaves no folder behind
        os.close(fd)  # closing the descriptor releases the flock


def _remove_empty(folder: Path, path: Path) -> None:
    """Remove the lock file (still locked: nobody else can take it meanwhile) and then the folder, if still empty."""
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def _describe_holder(path: Path) -> str:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return (
            f"{record['job']} (pid {record['pid']} on {record['host']}, started {record['started']}, "
            f"command: {record['command']})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not recorded itself yet"

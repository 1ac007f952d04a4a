"""One trainer per output.dir: an exclusive `fcntl` lock on `<output.dir>/.lock`, held for the life of the process.

Two trainers in one directory would interleave checkpoints, prune each other's and race on `latest`. The lock is a
POSIX record lock (`fcntl.lockf`), which network filesystems (NFS, Lustre) honour across nodes, and which the kernel
drops when the process dies however it dies, so a killed trainer never leaves a stale lock behind.

The lock file is created with the run directory and never removed; taking the lock opens it without writing, so
checking an existing run changes no file. Only rank 0 locks: the ranks of one job share the directory.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from trainer.errors import UserError

LOCK_FILE = ".lock"
_held: dict[str, int] = {}  # lock file path -> open descriptor (closing it would drop the lock)


def lock_run_dir(run_dir: str | Path, create: bool) -> None:
    """Take the lock on `run_dir` (idempotent within a process); UserError if another process holds it.

    create=False only locks a directory whose lock file already exists (checks must not write); create=True makes
    the lock file first (with the run directory, right before the trainer's first write).
    """
    path = Path(run_dir) / LOCK_FILE
    key = str(path.absolute())
    if key in _held:
        if _same_file(_held[key], path):
            return
        os.close(_held.pop(key))  # the directory was removed and made again: lock the new file
    if not create and not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except OSError as err:
        raise UserError(f"cannot create the lock file {path} ({err.strerror})",
                        "check that output.dir is writable, or pick another output.dir") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EACCES, errno.EAGAIN):
            raise UserError(f"output.dir {run_dir} is in use by another trainer (it holds the lock on {path})",
                            "wait for that run to finish or stop it, or pick another output.dir") from None
        print(f"notice: {path} cannot be locked on this filesystem ({err.strerror}): "
              "make sure no other trainer writes to this output.dir", flush=True)
        return
    _held[key] = fd


def _same_file(fd: int, path: Path) -> bool:
    """The descriptor still refers to the file at `path` (not to one deleted and made again)."""
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except OSError:
        return False

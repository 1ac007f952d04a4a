"""Durable, atomic file-system steps shared by checkpoints and exports: fsync, write-then-rename, directory swaps.

A rename is atomic, but only durable once the directory holding it is fsynced, and only publishes complete data if
the files were fsynced first. Replacing a *non-empty directory* has no portable atomic call: `replace_dir` uses
Linux's `renameat2(RENAME_EXCHANGE)` (glibc, through ctypes), which swaps the two names in one step, so at every
instant the target is either the old tree or the new one. Where that call is missing (other systems, a filesystem
without it) the old tree is first renamed aside to `.old-<name>` and the new one renamed in; `recover_dir` puts the
old tree back if a kill fell between those two renames.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable; not possible on every platform."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory bottom-up, so a rename publishes durable data."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_atomically(path: Path, text: str) -> None:
    """Write `path` through `<path>.tmp` and a rename: readers see the old or the new content, never half."""
    tmp = path.with_name(path.name + ".tmp")
    write_synced(tmp, text)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _aside(target: Path) -> Path:
    return target.with_name(f".old-{target.name}")


def replace_dir(new: Path, target: Path) -> None:
    """Put the directory `new` at `target` (same filesystem); the previous `target` survives until `new` is there."""
    fsync_tree(new)
    if not target.exists():
        os.replace(new, target)
    elif exchange(new, target):
        shutil.rmtree(new)  # `new` now names the previous tree
    else:
        old = _aside(target)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old)
    fsync_dir(target.parent)


def recover_dir(target: Path) -> None:
    """After a kill between the two renames of `replace_dir`'s fallback: the previous tree goes back in place."""
    old = _aside(target)
    if old.is_dir() and not target.exists():
        os.replace(old, target)
    elif old.is_dir():
        shutil.rmtree(old, ignore_errors=True)  # the new tree made it: the old one was about to be removed

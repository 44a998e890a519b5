"""Atomic file output: write to a temporary name beside the target, rename on success.

A failing step therefore never leaves a half-written artifact under its final name; a write that
fills the disk is one line naming the file and the free space (`InputError`), its temporary gone. A killed one
(SIGKILL, a node lost) can leave its temporary file, which at COCO scale is several GB: a step
removes the stale temporaries of its own outputs when it starts (`remove_stale_temporaries`).
"""

import contextlib
import errno
import logging
import os
import re
import shutil
from pathlib import Path

from pipeline_steps.common.errors import InputError

log = logging.getLogger(__name__)


def temporary_path(target):
    """`.<stem>.tmp-<pid><suffix>` beside `target`: hidden, and keeping the suffix that np.save,
    h5py and torch.save look at."""
    target = Path(target)
    return target.with_name(f".{target.stem}.tmp-{os.getpid()}{target.suffix}")


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(target):
    """Yield a temporary path next to `target`; rename it onto `target` if the block succeeds.

    On an exception the temporary file (or folder) is removed and the exception propagates.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except (OSError, RuntimeError) as err:
        written = _size(tmp)
        _remove(tmp)
        free = free_bytes(target.parent)
        # ENOSPC, or a writer (torch.save, h5py) that wraps it: the disk is as good as full.
        if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < FULL_DISK_BYTES:
            raise InputError(
                f"{target}: no space left on the disk: {free} bytes free in {target.parent} when "
                f"{written} bytes of it were written; free at least that much more and rerun"
            ) from None
        raise
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


FULL_DISK_BYTES = 1 << 20  # below this much free space a failed write is taken as a full disk


def free_bytes(folder):
    """Free bytes of the file system holding `folder` (a function, so tests can fill the disk)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0


def _size(path):
    try:
        return (
            sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            if path.is_dir()
            else path.stat().st_size
        )
    except OSError:
        return 0


def write_text_atomic(target, text):
    """Write a whole text file atomically (UTF-8)."""
    with atomic_path(target) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def remove_stale_temporaries(*targets):
    """Remove temporaries that killed writers left beside `targets`; return the removed paths.

    Call it before writing, once nothing else can be writing these outputs (Snakemake runs one
    job per output; a trainer first takes its resume folder's lock). Our own PID's name counts
    too: a PID is reused across reboots and containers.
    """
    removed = []
    for target in map(Path, targets):
        pattern = re.compile(rf"\.{re.escape(target.stem)}\.tmp-\d+{re.escape(target.suffix)}")
        if not target.parent.is_dir():
            continue
        for entry in target.parent.iterdir():
            if pattern.fullmatch(entry.name):
                _remove(entry)
                removed.append(entry)
                log.info("removed %s, left by a killed writer", entry)
    return removed

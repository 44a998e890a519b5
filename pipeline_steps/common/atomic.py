"""Atomic file output: write to a temporary name beside the target, rename on success.

A killed or failing step therefore never leaves a half-written artifact under its final name.
"""
import contextlib
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target):
    """Yield a temporary path next to `target`; rename it onto `target` if the block succeeds.

    The temporary name keeps the target's suffix (np.save, h5py and torch.save look at it).
    On an exception the temporary file (or folder) is removed and the exception propagates.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}{target.suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text_atomic(target, text):
    """Write a whole text file atomically (UTF-8)."""
    with atomic_path(target) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")

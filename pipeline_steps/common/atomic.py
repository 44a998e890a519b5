"""Atomic file output: write to a temporary name beside the target, rename on success.

A failing step therefore never leaves a half-written artifact under its final name. A killed one
(SIGKILL, a node lost) can leave its temporary file, which at COCO scale is several GB: a step
removes the stale temporaries of its own outputs when it starts (`remove_stale_temporaries`).
"""

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path

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
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


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

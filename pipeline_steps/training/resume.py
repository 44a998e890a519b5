"""The resume folder of a training run: what a rerun continues from after a kill.

It lives outside the rule's declared outputs (Snakemake deletes those when a job fails) and holds
    state.pt          weights, optimiser, random states, position, history, and the name of
    best-<iter>.pt    the best checkpoint so far, one file per improvement
    .lock             held (flock) by the one trainer that uses the folder

Three rules make it survive any kill and any second trainer:
- One trainer per folder. `ResumeFolder.lock()` takes an exclusive, non-blocking flock; a second
  trainer (say an orphan of a killed Snakemake still runs) is refused with a line naming the
  holder. The lock goes with the process, crashes and SIGKILL included.
- A state is used only when complete: state.pt loads, belongs to this run (its fingerprint), and
  the best checkpoint it names is there and is the one it names. Anything else is discarded with
  a warning and training starts over; it never crashes a rerun.
- Writes and removals are ordered so that a kill at any moment leaves either the previous
  complete state or nothing that claims to be one: a new best file is written under a new name,
  then state.pt (atomically), and only then are older best files removed; when the run finishes,
  state.pt goes first, then the rest, then the folder and its empty parents up to `.resume`.
"""

import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from pipeline_steps.training.checkpoint import load_torch, save_torch

log = logging.getLogger(__name__)
STATE = "state.pt"
LOCK = ".lock"
# A resume folder sits under a root of this name (results/.resume/...); emptied parents up to it go.
ROOT_NAME = ".resume"


class FolderInUse(Exception):
    """Another live process holds the folder's lock; the message names it."""


def best_name(iteration):
    return f"best-{iteration:09d}.pt"


class ResumeFolder:
    def __init__(self, path):
        self.path = Path(path)
        self._lock_fd = None

    # ---- the lock ---------------------------------------------------------------------------
    def lock(self):
        """Take the folder for this process (creating it); raise FolderInUse if another has it."""
        while True:
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the holder removed the folder just now: make it again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown process"
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise FolderInUse(
                    f"{self.path} is in use by another trainer ({holder}); wait for "
                    "it to finish or stop it, then rerun"
                ) from None
            try:  # the holder may have removed the folder between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(self.path / LOCK).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            f"pid {os.getpid()} on {socket.gethostname()}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
            0,
        )
        self._lock_fd = fd
        # Nobody else writes here now: temporaries are leftovers of a killed writer.
        for entry in self.path.iterdir():
            if entry.name.startswith(".") and ".tmp-" in entry.name:
                entry.unlink()

    def unlock(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- state ------------------------------------------------------------------------------
    def load_state(self, fingerprint):
        """The saved state if it is complete and belongs to this run, else None (and the folder's
        stale files are removed, with a warning saying why)."""
        state_path = self.path / STATE
        problem = None
        if state_path.exists():
            try:
                state = load_torch(state_path)
            except ValueError as err:
                problem = f"unreadable ({err})"
            else:
                problem = self._check(state, fingerprint)
                if problem is None:
                    return state
            log.warning("resume state in %s is not usable: %s; training starts over", self.path, problem)
        self.discard()
        return None

    def _check(self, state, fingerprint):
        if not isinstance(state, dict) or "best_iteration" not in state:
            return "incomplete (no best checkpoint named)"
        if state.get("fingerprint") != fingerprint:
            return "it belongs to another configuration"
        if state["best_iteration"] is None:
            return None
        best = self.path / best_name(state["best_iteration"])
        if not best.exists():
            return f"its best checkpoint {best.name} is missing"
        try:
            iteration = load_torch(best).get("iteration")
        except (ValueError, AttributeError) as err:
            return f"its best checkpoint {best.name} is unreadable ({err})"
        if iteration != state.get("best_iteration"):
            return f"{best.name} is from iteration {iteration}, not {state.get('best_iteration')}"
        return None

    def read_state(self):
        """The saved state as it is (rank 0 validated it), or None."""
        return load_torch(self.path / STATE) if (self.path / STATE).exists() else None

    def save_state(self, state):
        """Write state.pt atomically, then drop best files it no longer names (its best file is
        `best_name(state["best_iteration"])`)."""
        save_torch(self.path / STATE, state)
        best = None if state["best_iteration"] is None else best_name(state["best_iteration"])
        for entry in self.path.glob("best-*.pt"):
            if entry.name != best:
                entry.unlink()

    def discard(self):
        """Drop the saved state and best checkpoints (keeping the lock)."""
        if (self.path / STATE).exists():
            (self.path / STATE).unlink()  # first: nothing left claims to be a resumable state
        for entry in self.path.iterdir():
            if entry.name != LOCK and entry.is_file():
                entry.unlink()

    # ---- the end ----------------------------------------------------------------------------
    def remove(self):
        """The run is finished: remove the folder (state first), then emptied parents up to the
        `.resume` root, and release the lock."""
        self.discard()
        (self.path / LOCK).unlink(missing_ok=True)
        self.unlock()
        try:
            self.path.rmdir()
        except OSError:  # something we did not write is there: leave it
            return
        parent = self.path.parent
        if not any(p.name == ROOT_NAME for p in [parent, *parent.parents]):
            return
        while parent.name != ROOT_NAME:
            try:
                parent.rmdir()
            except OSError:  # not empty (another run's folder), or already gone
                return
            parent = parent.parent

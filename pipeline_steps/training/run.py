"""The resume state of a training run (`Run`): weights, optimiser, random states, position, best
score and history, saved after each validation into its ResumeFolder (training/resume.py) and
restored by a rerun; and the checkpoints it writes, which record their run's settings.
"""

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from pipeline_steps.data.splits import read_manifest
from pipeline_steps.retrieval.metrics import val_score4
from pipeline_steps.training import distributed
from pipeline_steps.training.checkpoint import save_checkpoint
from pipeline_steps.training.resume import FolderInUse, ResumeFolder, best_name

log = logging.getLogger("train")


def fingerprint(args):
    """What makes two runs the same run; resume state from a different run is not reused.

    The arguments, and the identity (size, modification time) of the files behind them: data
    prepared again (another vocabulary), candidates mined again or a starting checkpoint trained
    again keep their paths but make another run."""
    keys = [
        "data",
        "prepared",
        "model",
        "model_config",
        "train_config",
        "loss_config",
        "candidates_i2t",
        "candidates_t2i",
        "seed",
    ]
    if args.init_from:  # only then: the resume states of every other run keep their fingerprint
        keys.append("init_from")
    inputs = [
        Path(args.data) / "train_ims.npy",
        Path(args.prepared) / "manifest.json",
        Path(args.prepared) / "train_ids.npz",
        args.candidates_i2t,
        args.candidates_t2i,
        args.init_from,
    ]
    stats = {str(f): os.stat(f) for f in inputs if f and os.path.exists(f)}
    identity = {name: [st.st_size, st.st_mtime_ns] for name, st in stats.items()}
    text = json.dumps({"args": {k: getattr(args, k) for k in keys}, "files": identity}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class Run:
    """Training state that a resume restores: weights, optimiser, position, best score, history.
    Rank 0 holds the resume folder's lock and alone writes it (with every process's random
    state); every process restores from it (pipeline_steps/training/resume.py)."""

    def __init__(self, args, model, optimizer, resume_dir, ctx=distributed.SINGLE):
        self.args, self.model, self.optimizer, self.ctx = args, model, optimizer, ctx
        self.folder = ResumeFolder(resume_dir)
        self.dir = self.folder.path
        self.epoch, self.next_batch, self.iteration = 0, 0, 0
        self.best_score, self.best_iteration, self.history = float("-inf"), None, []
        self.saved_iteration = None  # the iteration of the resume state on disk
        self.fingerprint = fingerprint(args)
        self.vocabulary = vocabulary_of(args.prepared)  # what each checkpoint records, read once
        self.state = None  # the resume state rank 0 found usable

    def take_folder(self):
        """Rank 0 locks the resume folder and drops a state that is not complete; every process
        stops with the same one-line error if another trainer holds it."""
        problem = None
        if self.ctx.is_main:
            try:
                self.folder.lock()
            except FolderInUse as err:
                problem = str(err)
            else:
                self.state = self.folder.load_state(self.fingerprint)  # discards an unusable one
                if self.state is not None and not self._fits(self.state):
                    log.warning("resume state in %s does not fit this model; training starts over", self.dir)
                    self.folder.discard()
                    self.state = None
        problem = next((p for p in self.ctx.gather_objects(problem) if p), None)
        if problem:
            raise SystemExit(f"error: {problem}")
        self.ctx.barrier()

    def _fits(self, state):
        """Whether the saved weights have this model's names and shapes (load_state_dict would
        copy what fits before it refused the rest)."""
        own = self.model.state_dict()
        saved = state.get("model", {})
        return saved.keys() == own.keys() and all(saved[k].shape == own[k].shape for k in own)

    def try_resume(self):
        """Restore the state rank 0 validated (the others read it after rank 0 kept it)."""
        state = self.state if self.ctx.is_main else self.folder.read_state()
        if state is None:
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if self.ctx.enabled:
            self.ctx.restore_rng(state.get("rank_rng"), self.args.seed, state["iteration"])
        elif state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.epoch, self.next_batch = state["epoch"], state["next_batch"]
        self.iteration, self.best_score = state["iteration"], state["best_score"]
        self.best_iteration, self.history = state["best_iteration"], state["history"]
        self.saved_iteration = self.iteration
        log.info("resuming at epoch %d batch %d (iteration %d)", self.epoch, self.next_batch, self.iteration)
        return True

    def save_state(self):
        """Called by every process (it gathers their random states); rank 0 writes."""
        rank_rng = self.ctx.gather_objects(self.ctx.rng_state()) if self.ctx.enabled else None
        if self.ctx.is_main:
            cuda_all = torch.cuda.is_available() and not self.ctx.enabled  # a process touches its GPU only
            self.folder.save_state(
                {
                    "fingerprint": self.fingerprint,
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if cuda_all else [],
                    "rank_rng": rank_rng,
                    "epoch": self.epoch,
                    "next_batch": self.next_batch,
                    "iteration": self.iteration,
                    "best_score": self.best_score,
                    "best_iteration": self.best_iteration,
                    "history": self.history,
                }
            )
        self.saved_iteration = self.iteration
        self.ctx.barrier()

    def checkpoint(self, path, metrics):
        save_checkpoint(
            path,
            self.model,
            epoch=self.epoch,
            iteration=self.iteration,
            val_score4=val_score4(metrics),
            metrics=metrics,
            seed=self.args.seed,
            train_config=self.args.train_config,
            loss_config=self.args.loss_config,
            **self.vocabulary,
        )

    @property
    def best_path(self):
        return self.dir / best_name(self.best_iteration)


def vocabulary_of(prepared):
    """The prepared vocabulary's digest, which a checkpoint records (where the manifest has it)."""
    digest = read_manifest(prepared).get("vocab_sha256")
    return {"vocab_sha256": digest} if digest else {}

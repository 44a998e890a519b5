"""TensorBoard scalars of a training run (`--tensorboard-dir`), for watching it while it trains.

Tags, each at the iteration it describes (1 = after the first optimiser step):
  loss/total             the batch's loss, as the optimiser saw it
  loss/<term>            its parts, which sum to loss/total: online, offline_triplet, quintuplet
                         (AOQ variants), auxiliary (VSRN's captioning loss)
  train/adaptive_weight_mean   mean AdapOffQuin weight of the online hinges (adaptive epochs only)
  train/lr               learning rate
  val/<metric>           every validation metric (R@K, medr, meanr, rsum) and val_score4, at the
                         iteration of the validation (the `iteration` column of the step's CSV log)

The folder is a view of the run, not one of its outputs: nothing reads it, and the workflow keeps
it out of the rule's outputs and rerun checks.
"""

import torch


class NoBoard:
    """What a run logs to when TensorBoard is off (or on every process but rank 0): nothing."""

    active = False

    def training_step(self, iteration, loss, terms, stats, lr):
        pass

    def validation(self, iteration, metrics):
        pass

    def close(self):
        pass


class ScalarBoard(NoBoard):
    """Writes the scalars of one run to its TensorBoard folder."""

    active = True

    def __init__(self, folder, resumed_at):
        # Imported here: only runs that log pay for loading TensorBoard and protobuf.
        from torch.utils.tensorboard import SummaryWriter

        # A run that resumes at iteration T replays the iterations after T, which the killed
        # process may already have logged; TensorBoard hides every event from step T + 1 on in
        # the older files. A fresh run (T = 0) likewise hides a previous run in the same folder.
        self.writer = SummaryWriter(str(folder), purge_step=resumed_at + 1)

    def training_step(self, iteration, loss, terms, stats, lr):
        """`loss` a float; `terms` and `stats` map names to detached 0-d tensors."""
        names = [f"loss/{name}" for name in terms] + [f"train/{name}" for name in stats]
        tensors = [*terms.values(), *stats.values()]
        # One device-to-host copy for all of them, not one synchronisation per scalar.
        values = torch.stack([t.float() for t in tensors]).tolist() if tensors else []
        self.writer.add_scalar("loss/total", loss, iteration)
        for name, value in zip(names, values):
            self.writer.add_scalar(name, value, iteration)
        self.writer.add_scalar("train/lr", lr, iteration)

    def validation(self, iteration, metrics):
        for name, value in metrics.items():
            if isinstance(value, int | float):  # 5-fold results also hold the per-fold dicts
                self.writer.add_scalar(f"val/{name}", value, iteration)
        # On disk by the time the resume state of this validation is.
        self.writer.flush()

    def close(self):
        self.writer.close()


def open_board(folder, resumed_at):
    """A ScalarBoard writing to `folder`, or a NoBoard when `folder` is None."""
    return NoBoard() if folder is None else ScalarBoard(folder, resumed_at)

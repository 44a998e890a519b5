"""Data-parallel training over several processes (torch.distributed): launch detection, the
process group, and the collectives that make a W-process step compute the single-process step.

Launch
  torchrun: `python -m torch.distributed.run --nproc_per_node N -m pipeline_steps.train ...`
            (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
  SLURM:    `srun --ntasks N --kill-on-bad-exit=1 python -m pipeline_steps.train ...`: rank =
            SLURM_PROCID, world = SLURM_STEP_NUM_TASKS (else SLURM_NTASKS), local rank =
            SLURM_LOCALID. MASTER_ADDR defaults to the first host of the step's node list
            (`scontrol show hostnames`), MASTER_PORT to 20000 + SLURM_JOB_ID % 10000 (set it for two
            multi-process steps in one job). Only a task that srun started (a numeric SLURM_STEP_ID)
            counts: a batch script running python by itself stays one process.
  Anything else, a world of 1, or `--distributed off`: one process, no process group, and every
  collective below is a no-op. One process per GPU: cuda:(LOCAL_RANK mod visible GPUs) with NCCL
  (control messages over a gloo group); on CPU, gloo. Resume state and outputs must be on a
  filesystem every node sees.

Why a W-process step equals the single-process step
  Every process builds the same global batch of B items and encodes its contiguous shard
  (batches.shard_bounds). `whole_batch` gathers the other shards' representations *without*
  gradient and puts this process's live ones in their place, so each process computes the whole
  B x B score matrix and the whole-batch loss L, the value the single process computes, with the
  unchanged loss code (models/losses.py). The gradient of that copy of L reaches only the process's
  own shard: it is the part of dL/dtheta that flows through shard r. By the chain rule these parts
  add up to dL/dtheta, so `sum_gradients` (an all-reduce SUM; no averaging, no rescaling) leaves the
  single-process gradient on every process; clipping the total norm and Adam then see identical
  gradients, and the weights stay identical across processes. Per-anchor terms follow the same
  rule: the AOQ offline scores are gathered like representations, and a per-sample mean (VSRN's
  captioning loss) is recombined as sum_r n_r mean_r / B (`batch_mean`). BatchNorm layers become
  `SyncedBatchNorm`: training batches are normalised with the whole batch's statistics through a
  differentiable all-reduce, and the running statistics get the single process's updates.
  DistributedDataParallel is not used: it hooks `forward()`, while training calls several entry
  points (anchor_forward, encode_images, encode_captions, score_all, score_paired), and it averages
  gradients where this scheme sums them. The price is no overlap of the gradient all-reduce with
  the backward pass.

  Every process must hold at least one item of every batch (`check_batch_split`); shards of a
  batch that W does not divide differ by one item, and gathers pad them.

What is not identical
  Float rounding: a shard is encoded as a smaller batch and sums are reduced in another order, so
  losses and weights agree to about 1e-7 relative, not bit for bit. A parameter whose exact
  gradient is zero (the bias of a layer feeding a training-mode BatchNorm, as VSRN's Rs_GCN W.0)
  gets rounding noise that Adam turns into steps of up to lr, as between any two runs that round
  differently; the training loss does not depend on it (the running mean, which it shifts, does
  in eval). Dropout (VSRN's captioning branch, always on in training): each process draws masks
  for its own rows from its own stream (rank 0 the seed's stream, rank r > 0 reseeded from
  (seed, r)), so a dropout model takes another, equally valid, random path than the single-process
  run. Each process's stream is saved in the resume state and restored when the run resumes with
  the same number of processes.
"""

import datetime
import logging
import os
import subprocess
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline_steps.common.device import pick_device

log = logging.getLogger(__name__)
TIMEOUT = datetime.timedelta(hours=4)  # other ranks wait at a barrier while rank 0 validates
FIRST_SPECIAL_STEP_ID = 0xFFFFFF00  # Slurm's batch, extern and interactive steps sit above this


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None = None  # None: already in the environment (torchrun)
    master_port: str | None = None


def first_slurm_host(nodelist):
    """First host of a Slurm node list such as 'gpu[03-04]', via `scontrol show hostnames`."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(
            f"error: cannot expand the SLURM node list {nodelist!r} ({err}); "
            "set MASTER_ADDR to the host of rank 0"
        ) from None
    return out.split()[0]


def _srun_task(env):
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
    return step.isdigit() and int(step) < FIRST_SPECIAL_STEP_ID


def launch_from_env(environ=None, first_host=first_slurm_host):
    """This process's place in a torchrun or srun launch, or None outside one."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" not in env or not _srun_task(env):
        return None
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    addr = env.get("MASTER_ADDR")
    if addr is None and world > 1:
        nodelist = next(
            (env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST") if env.get(k)),
            None,
        )
        if not nodelist:
            raise SystemExit("error: SLURM gives no node list; set MASTER_ADDR to the host of rank 0")
        addr = first_host(nodelist)
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID") or 0) % 10000)
    return Launch(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID") or 0), addr, port)


def process_device(name, local_rank):
    """'auto' or 'cuda' -> this process's GPU (local rank modulo the visible GPUs, so one visible
    GPU per task works too); 'auto' without a GPU -> 'cpu'; anything else as given."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return "cpu" if name == "auto" else name


def setup(device_name, enabled=True, environ=None):
    """The Context of this process: joins the process group of a multi-process launch."""
    launch = launch_from_env(environ) if enabled else None
    if launch is None or launch.world_size <= 1:
        return Context(device=pick_device(device_name))
    device = process_device(device_name, launch.local_rank)
    if launch.master_addr is not None:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = launch.master_addr, launch.master_port
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, timeout=TIMEOUT)
    # Objects and barriers go over gloo: waiting ranks then wait on the CPU, not in a GPU kernel.
    control = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend == "nccl" else None
    return Context(launch.rank, launch.world_size, device, control)


class Context:
    """This process's part in a run. A single process (world_size 1) has no process group and
    every collective is a no-op, so the trainer calls them unconditionally."""

    def __init__(self, rank=0, world_size=1, device="cpu", control_group=None):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.control_group = control_group

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def check_batch_split(self, n_items, batch_size):
        """Every process needs at least one item of every batch (the last one included)."""
        last = n_items % batch_size or batch_size
        if min(batch_size, last) < self.world_size:
            raise SystemExit(
                f"error: {self.world_size} processes need at least as many items in every "
                f"batch, but {n_items} items in batches of {batch_size} leave {last} for "
                "the last one; change the batch size or the number of processes"
            )

    def prepare_model(self, model, seed):
        """Before the optimiser is built: whole-batch BatchNorm statistics, and a dropout stream
        of its own for every rank > 0. Nothing for a single process."""
        if self.enabled:
            sync_batchnorm(model)
            self.seed_own_stream(seed)
            log.info("%d processes (%s), each batch split by rank", self.world_size, dist.get_backend())
        return model

    # ---- the training step ----------------------------------------------------------------------
    def all_gather_rows(self, tensor):
        """Every process's `tensor` (>= 1 dim), detached, in rank order. Shapes may differ between
        processes (a ragged last batch, each shard's longest caption): padded for the transfer."""
        local = tensor.detach().to(self.device)
        shape = torch.tensor(local.shape, dtype=torch.int64, device=self.device)
        shapes = [torch.empty_like(shape) for _ in range(self.world_size)]
        dist.all_gather(shapes, shape)
        padded = local.new_zeros(torch.stack(shapes).amax(dim=0).tolist())
        padded[tuple(slice(0, n) for n in local.shape)] = local
        pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(pieces, padded)
        return [
            piece[tuple(slice(0, n) for n in s.tolist())].to(tensor.device)
            for piece, s in zip(pieces, shapes)
        ]

    def whole_batch(self, rep, concat=torch.cat):
        """The whole batch's representation from the shards: the other processes' rows without
        gradient, this process's rows live. `rep` is a tensor or a tuple of tensors with rows
        first (a model's representation); `concat` joins a list of them in row order."""
        if not self.enabled:
            return rep
        fields = tuple(rep) if isinstance(rep, tuple) else (rep,)
        gathered = [self.all_gather_rows(field) for field in fields]  # [field][rank]
        pieces = []
        for rank in range(self.world_size):
            parts = [per_rank[rank] for per_rank in gathered]
            if rank == self.rank:
                pieces.append(rep)
            elif not isinstance(rep, tuple):
                pieces.append(parts[0])
            else:
                pieces.append(rep._make(parts) if hasattr(rep, "_make") else tuple(parts))
        return concat(pieces)

    def batch_mean(self, mean, n_rows):
        """The whole batch's per-sample mean from this shard's mean over its n_rows rows; the
        gradient reaches this shard's term only (weight n_rows / B)."""
        if not self.enabled:
            return mean
        pieces = self.all_gather_rows(torch.stack([mean.detach() * n_rows, mean.new_tensor(float(n_rows))]))
        total = torch.stack(pieces).sum(dim=0)  # (sum of n_r mean_r, B)
        others = total[0] - pieces[self.rank][0]
        return (mean * n_rows + others) / total[1]

    def sum_gradients(self, parameters, bucket_elements=1 << 24):
        """Sum .grad over processes, in place, a bucket at a time. A parameter with a gradient on
        some process gets zeros where it had none; one with none anywhere keeps None (Adam skips
        it, as in the single process)."""
        if not self.enabled:
            return
        params = [p for p in parameters if p.requires_grad]
        has_grad = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
        dist.all_reduce(has_grad)
        params = [p for p, flag in zip(params, has_grad.tolist()) if flag > 0]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket, size = [], 0
        for p in params + [None]:
            if bucket and (p is None or size + p.numel() > bucket_elements):
                flat = torch.cat([q.grad.reshape(-1) for q in bucket])
                dist.all_reduce(flat)
                for q, part in zip(bucket, flat.split([q.numel() for q in bucket])):
                    q.grad.copy_(part.view_as(q.grad))
                bucket, size = [], 0
            if p is not None:
                bucket.append(p)
                size += p.numel()

    # ---- coordination ---------------------------------------------------------------------------
    def gather_objects(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every process (picklable objects)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control_group)
        return out

    def agree(self, what, value):
        """Stop with an error unless every process holds the same `value`."""
        values = self.gather_objects(value)
        if any(v != values[0] for v in values):
            raise SystemExit(
                f"error: the processes disagree about {what}: {values} (is the resume "
                "folder on a filesystem that every node sees?)"
            )

    def broadcast_from_main(self, tensors):
        """Overwrite `tensors` (on this process's device) in place with rank 0's values."""
        if self.enabled:
            for tensor in tensors:
                dist.broadcast(tensor, src=0)

    def barrier(self):
        if self.enabled:
            dist.barrier(group=self.control_group)

    def close(self):
        """Wait for every process, then leave the process group."""
        if self.enabled:
            self.barrier()
            dist.destroy_process_group()

    # ---- random streams (dropout) ---------------------------------------------------------------
    def rng_state(self):
        """This process's CPU generator and, on a GPU, its device's generator."""
        on_gpu = str(self.device).startswith("cuda")
        cuda = torch.cuda.get_rng_state(self.device) if on_gpu else torch.empty(0, dtype=torch.uint8)
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def seed_own_stream(self, seed, salt=0):
        """Rank r > 0 gets a stream of its own derived from (seed, r, salt); rank 0 keeps its stream."""
        if self.rank > 0:
            torch.manual_seed(int(np.random.SeedSequence([seed, self.rank, salt]).generate_state(1)[0]))

    def restore_rng(self, states, seed, salt):
        """Restore this process's saved stream; a run saved with another number of processes
        gives ranks > 0 fresh streams instead."""
        if states and len(states) == self.world_size:
            torch.set_rng_state(states[self.rank]["cpu"])
            if len(states[self.rank]["cuda"]) and str(self.device).startswith("cuda"):
                torch.cuda.set_rng_state(states[self.rank]["cuda"], self.device)
        else:
            self.seed_own_stream(seed, salt)


SINGLE = Context()


class _AllReduceSum(torch.autograd.Function):
    """y = sum over processes of x, with gradient: each process's loss depends on its copy of y,
    so dL/dx on each process is the sum over processes of their dL/dy."""

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm that, in training, normalises with the statistics of the whole batch across
    processes (two-pass mean and biased variance, both all-reduced with gradient) and updates the
    running statistics with them (unbiased variance), as one process holding the whole batch
    would. In eval mode it is plain BatchNorm (running statistics, no communication)."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # statistics in at least float32 (autocast)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), x.new_tensor([x.numel() // x.shape[1]])]))
        n = sums[-1]  # rows in the whole batch
        mean = sums[:-1] / n  # (C,)
        centered = x - mean.view(shape)
        var = _AllReduceSum.apply(centered.pow(2).sum(dims)) / n  # (C,) biased
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * n / (n - 1), alpha=factor)
        return out.to(dtype)


def sync_batchnorm(module):
    """Replace every BatchNorm under `module` by a SyncedBatchNorm holding the same values (state
    dict keys unchanged). Call before the optimiser is built: the parameters are new objects."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, SyncedBatchNorm):
            synced = SyncedBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            tensors = list(child.parameters()) + list(child.buffers())
            if tensors:
                synced.to(tensors[0].device)
            synced.load_state_dict(child.state_dict())
            synced.train(child.training)
            setattr(module, name, synced)
        else:
            sync_batchnorm(child)
    return module

"""Run a command on GPUs of its own: Snakemake counts a `gpu` resource but never says which devices.

A local job that asks for N GPUs takes an exclusive lock on N free slot files (one per device of
this machine), sets CUDA_VISIBLE_DEVICES to those devices and execs the command, which inherits
the locks: they are released when it exits, however it exits (a crash or SIGKILL included).
Several Snakemake runs on one machine share the slots, since the locks live in one folder.
Under SLURM (SLURM_JOB_ID set) SLURM has already chosen the devices, and with 0 GPUs there is
nothing to choose: the command is exec'd unchanged.

The machine's devices: CUDA_VISIBLE_DEVICES if it is set (slots are its entries), else 0..N-1 with
N from --slots, else $AOQ_LOCAL_GPUS, else the number of GPUs `nvidia-smi -L` lists. Not a rule
of its own: the workflow wraps the command of every GPU job in it (workflow/plan.py, Plan.step_command).

Example:
    python -m pipeline_steps.gpu_slot --gpus 1 -- python -m pipeline_steps.evaluate ...
"""

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time


def local_devices(slots=None, env=os.environ):
    """Device ids this machine shares out, in slot order."""
    count = slots if slots is not None else env.get("AOQ_LOCAL_GPUS")
    if "CUDA_VISIBLE_DEVICES" in env:  # set empty, it hides every device
        visible = [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
        return visible if count is None else visible[: int(count)]
    if count is None:
        count = count_nvidia_gpus()
    return [str(i) for i in range(int(count))]


def count_nvidia_gpus():
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())


def acquire(n, devices, lock_dir, poll_s=0.5):
    """Lock n of `devices` (blocking until n are free at once): [(device, fd)]."""
    os.makedirs(lock_dir, exist_ok=True)
    waiting = False
    while True:
        held = []
        for device in devices:
            fd = os.open(os.path.join(lock_dir, f"gpu{device}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            held.append((device, fd))
            if len(held) == n:
                return held
        for _, fd in held:  # never sit on some slots while waiting for others
            os.close(fd)
        if not waiting:
            print(
                f"gpu_slot: waiting for {n} free GPU slot(s) of {len(devices)}", file=sys.stderr, flush=True
            )
            waiting = True
        time.sleep(poll_s)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, required=True, help="GPUs this job asked for")
    p.add_argument("--slots", type=int, help="GPUs of this machine (default: see above)")
    p.add_argument(
        "--lock-dir",
        default=os.environ.get("AOQ_GPU_LOCK_DIR", os.path.join(tempfile.gettempdir(), "aoq-gpu-slots")),
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the command and its arguments")
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        p.error("no command given (put it after --)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.gpus > 0 and not os.environ.get("SLURM_JOB_ID"):
        devices = local_devices(args.slots)
        if not devices:
            print(
                f"gpu_slot: {args.gpus} GPU(s) asked for but none found; running without",
                file=sys.stderr,
                flush=True,
            )
        elif args.gpus > len(devices):
            sys.exit(f"gpu_slot: {args.gpus} GPUs asked for but this machine has {len(devices)}")
        else:
            held = acquire(args.gpus, devices, args.lock_dir)
            for _, fd in held:
                os.set_inheritable(fd, True)  # the command holds the locks until it exits
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(device for device, _ in held)
            print(
                f"gpu_slot: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}",
                file=sys.stderr,
                flush=True,
            )
    os.execvp(args.command[0], args.command)


if __name__ == "__main__":
    main()

"""Data parallel for train.py and eval.py. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without it, one process.
And preemption: the signals a scheduler sends before it stops a job end the run at a step's end, with a checkpoint."""
import os
import signal
import sys

import torch
import torch.distributed as dist


def setup(device):
    """Join torchrun's process group (NCCL between GPUs, gloo between CPUs); returns this process's device."""
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
        if str(device).startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)  # NCCL (all_gather_object too) sends through the current device
    return device


def teardown():
    """Leave the process group together: a rank that closed its connections while another still used them would
    abort that one (gloo)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def log(*args):
    if rank() == 0:
        print(*args, flush=True)


def sum_over_ranks(count, device):
    """A host-side number (or list of numbers) summed over the ranks: one small all-reduce."""
    if not dist.is_initialized():
        return count
    total = torch.tensor(count, device=device)
    dist.all_reduce(total)
    return total.tolist()


def gather_from_ranks(value):
    """A picklable value from every rank, in rank order."""
    values = [value] * world_size()
    if dist.is_initialized():
        dist.all_gather_object(values, value)
    return values


# A preempted run exits with sysexits.h's EX_TEMPFAIL, "try again later": a job script can requeue the job on it
PREEMPTED = 75
received = []  # the preemption signals that reached this process, in order


def catch_preemption(extra_signal):
    """SIGTERM (Slurm, Kubernetes and spot machines send it before the kill) and `extra_signal` (Slurm's
    --signal=USR1@90 warning; "" for none) only note that they came: the handler may run in the middle of a
    checkpoint write, which it must not cut short. train.py stops at the end of the step (stop_requested)."""
    chosen = extra_signal if extra_signal.startswith("SIG") else "SIG" + extra_signal  # Slurm's way: USR1
    names = ["SIGTERM", chosen] if extra_signal else ["SIGTERM"]
    numbers = [getattr(signal, name, None) for name in names]
    if not all(isinstance(number, signal.Signals) for number in numbers) or names[-1] in ("SIGKILL", "SIGSTOP"):
        raise ValueError(f"preempt_signal={extra_signal!r} is not a signal a program can catch: e.g. 'SIGUSR1' "
                         "(Slurm's --signal=USR1@90), or '' for SIGTERM alone")
    for number in numbers:
        signal.signal(number, lambda number, frame: received.append(signal.Signals(number).name))
        if hasattr(signal, "siginterrupt"):  # system calls under way (gloo's, the data loader's) carry on, not EINTR
            signal.siginterrupt(number, False)


def stop_requested():
    """1 if a preemption signal reached this process, else 0: train.py sums it over the ranks once a step, so every
    rank stops after the same step even when the signal reached only some of them."""
    return int(bool(received))


def exit_preempted(where):
    """After the checkpoint of the step a signal came in: the line that says so, then every rank exits PREEMPTED."""
    log(f"preempted ({', '.join(dict.fromkeys(received)) or 'a signal to another rank'}): stopped after {where}; "
        "to go on, run the same command with --resume=True")
    # The checkpoint is saved. torchrun answers the first rank to exit 75 by sending SIGTERM to the others, and
    # Python gives the signals back their default (death) while it shuts down: ignored, every rank exits 75.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    teardown()
    sys.exit(PREEMPTED)

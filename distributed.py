"""Data parallel for train.py and eval.py. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without it, one process."""
import os

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
    if dist.is_initialized():
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

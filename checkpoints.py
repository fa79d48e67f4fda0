"""Checkpoints: the weights that VLM.load, sample.py and eval.py read, and what an exact resume needs (optimizer,
every rank's data position and random streams). A checkpoint is written into step-N.partial, renamed step-N,
and then named in out_dir/latest, each on disk (fsync) before the next: `latest` names a complete checkpoint."""
import errno
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from distributed import gather_from_ranks, log, rank, world_size
from model import VLM


def latest_checkpoint(out_dir):
    """The newest complete checkpoint of a training run, which out_dir/latest names; None if none."""
    path = os.path.join(out_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return os.path.join(out_dir, f.read().strip())


def checkpoint_folder(path):
    """A checkpoint folder as is, or a training run's out_dir as its newest checkpoint: train.py's init_from
    and the --checkpoint of sample.py and eval.py take either (config/stage2.py starts from "out/stage1")."""
    folder = latest_checkpoint(path) or path
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{path} is neither a checkpoint (config.json + model.safetensors) nor a training "
                                "run's out_dir (a 'latest' file naming its newest checkpoint)")
    return folder


def save_checkpoint(cfg, model, tokenizer, optimizer, step, data_position):
    """Rank 0 writes the checkpoint, with every rank's data position and random streams (a rank that skips a
    batch of bad samples reads ahead of the others); every rank waits until it is complete."""
    ranks = gather_from_ranks({"data": data_position, "rng": rng_state()})
    if rank() == 0:
        write_checkpoint(cfg, model, tokenizer, optimizer, step, ranks)
    if dist.is_initialized():
        dist.barrier()


def write_checkpoint(cfg, model, tokenizer, optimizer, step, ranks):
    out_dir = cfg["out_dir"]
    folder = os.path.join(out_dir, f"step-{step:07d}")
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save(partial, tokenizer=tokenizer)
    trainer_state = {"step": step, "optimizer": optimizer.state_dict(), "ranks": ranks, "config": cfg}
    torch.save(trainer_state, os.path.join(partial, "trainer.pt"))
    flush_to_disk(partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    flush_entries(out_dir)  # the rename itself on disk before `latest` names the folder
    write_atomically(os.path.join(out_dir, "latest"), os.path.basename(folder))
    # keep this checkpoint and the one before it; a later step's folder is an earlier run's, not this run's to prune
    earlier = sorted(f for f in os.listdir(out_dir)
                     if f.startswith("step-") and not f.endswith(".partial") and f < os.path.basename(folder))
    for old in earlier[:-1]:
        shutil.rmtree(os.path.join(out_dir, old))


def flush_to_disk(folder):
    """Every file of the folder, and its list of them, on disk: a power cut may then lose the newest
    checkpoint, but never leave `latest` naming files that did not reach the disk."""
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            os.fsync(f.fileno())
    flush_entries(folder)


def flush_entries(folder):
    """The folder's own entries (files created or renamed in it) on disk: a file's fsync does not carry them."""
    if os.name == "nt":  # Windows cannot open a folder to fsync it (NTFS journals renames itself)
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:  # some network and FUSE filesystems sync no folder; the files are synced already
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(descriptor)


def write_atomically(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    flush_entries(os.path.dirname(path) or ".")


def restore(folder, model, optimizer, stream, cfg):
    """Weights, optimizer moments, and this rank's random streams and data position; returns the step. The
    optimizer's settings (learning rates, weight decay, betas, fused) stay this run's: a resume may change them."""
    state = torch.load(os.path.join(folder, "trainer.pt"), map_location="cpu", weights_only=True)  # data, never code
    # checkpoints written before each rank's position was kept hold rank 0's, which every rank then takes
    ranks = state.get("ranks") or [{"data": state["data"], "rng": state["rng"]}] * world_size()
    if len(ranks) != world_size():
        raise ValueError(f"{folder} was saved by {len(ranks)} rank(s), not {world_size()}: resume on as many, "
                         "or the data would not continue where it stopped")
    model.load_state_dict(VLM.load(folder).state_dict())
    saved = state["optimizer"]
    trained, training = (list(dict.fromkeys(group["name"] for group in groups))  # the modules, each once
                         for groups in (saved["param_groups"], optimizer.param_groups))
    if trained != training:
        raise ValueError(f"{folder} trained {', '.join(trained)}, this run would train {', '.join(training)}: a resume "
                         "trains what the checkpoint trained, so each learning rate stays 0 or non-0 as it was; to "
                         f"change which modules train, start a new out_dir with --init_from={folder}")
    saved["param_groups"] = [{**this_run, "params": group["params"]}
                             for this_run, group in zip(optimizer.state_dict()["param_groups"], saved["param_groups"])]
    optimizer.load_state_dict(saved)
    stream.load_state_dict(ranks[rank()]["data"])
    set_rng_state(ranks[rank()]["rng"])
    changed = sorted(key for key, value in state["config"].items() if key != "resume" and cfg.get(key, value) != value)
    log(f"resumed from {folder} at step {state['step']}" + (f"; changed since: {', '.join(changed)}" if changed else ""))
    return state["step"]


def rng_state():
    """Every random stream, as tensors and lists, so the checkpoint loads with weights_only=True."""
    _, numpy_keys, numpy_position, _, _ = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": torch.from_numpy(numpy_keys.astype(np.int64)), "numpy_position": int(numpy_position)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_position"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

"""Checkpoints: the weights VLM.load reads and what an exact resume needs (optimizer, every rank's data position and
random streams): written to step-N.partial, renamed step-N, named in out_dir/latest, each on disk before the next."""
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
    """A checkpoint folder as is, or a training run's out_dir as its newest checkpoint (stage2.py: "out/stage1")."""
    folder = latest_checkpoint(path) or path
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{path} is neither a checkpoint (config.json + model.safetensors) nor a training "
                                "run's out_dir (a 'latest' file naming its newest checkpoint)")
    return folder


def save_checkpoint(cfg, model, tokenizer, optimizer, step, data_position):
    """Rank 0 writes it, with each rank's data position and random streams (one that skips bad samples reads ahead)."""
    ranks = gather_from_ranks({"data": data_position, "rng": rng_state()})
    if rank() == 0:
        write_checkpoint(cfg, model, tokenizer, optimizer, step, ranks)
    if dist.is_initialized():
        dist.barrier()


def write_checkpoint(cfg, model, tokenizer, optimizer, step, ranks):
    out_dir, name = cfg["out_dir"], f"step-{step:07d}"
    folder, partial = os.path.join(out_dir, name), os.path.join(out_dir, name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save(partial, tokenizer=tokenizer)
    trainer_state = {"step": step, "optimizer": optimizer.state_dict(), "ranks": ranks, "config": cfg}
    torch.save(trainer_state, os.path.join(partial, "trainer.pt"))
    for file in os.listdir(partial):  # a power cut may lose this checkpoint, never leave `latest` naming lost files
        with open(os.path.join(partial, file), "rb") as f:
            os.fsync(f.fileno())
    flush_entries(partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    flush_entries(out_dir)  # the rename itself on disk before `latest` names the folder
    write_atomically(os.path.join(out_dir, "latest"), name)
    # keep this checkpoint and the one before it; a later step's folder is an earlier run's, not this run's to prune
    earlier = sorted(f for f in os.listdir(out_dir)
                     if f.startswith("step-") and not f.endswith(".partial") and f < name)
    for old in earlier[:-1]:
        shutil.rmtree(os.path.join(out_dir, old))


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
    if len(state["ranks"]) != world_size():
        raise ValueError(f"{folder} was saved by {len(state['ranks'])} rank(s), not {world_size()}: resume on as "
                         "many, or the data would not continue where it stopped")
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
    stream.load_state_dict(state["ranks"][rank()]["data"])
    set_rng_state(state["ranks"][rank()]["rng"])
    changed = ", ".join(sorted(k for k, v in state["config"].items() if k != "resume" and cfg.get(k, v) != v))
    log(f"resumed from {folder} at step {state['step']}" + (f"; changed since: {changed}" if changed else ""))
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

"""Checkpoints: the weights VLM.load reads and what an exact resume needs (optimizer, every rank's data position and
random streams): written to step-N.partial, renamed step-N, named in out_dir/latest, each on disk before the next.
A resume takes the newest of them that loads whole (kept: the newest two), and says which it passed over and why."""
import errno
import os
import pickle
import random
import re
import shutil
import zipfile

import numpy as np
import torch
import torch.distributed as dist

from distributed import gather_from_ranks, log, rank, world_size
from model import VLM


class DamagedCheckpoint(Exception):
    """A checkpoint file that cannot be what train.py wrote. Not a ValueError: argparse (sample.py's --checkpoint)
    would replace the message, which names the file and the damage, by "invalid value"."""


def read_latest(out_dir):
    """The checkpoint name out_dir/latest holds (as train.py wrote it, step-N); None if there is no `latest`."""
    path = os.path.join(out_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        held = f.read()
    name = held.decode("utf-8", errors="replace").strip()
    if not name:
        raise DamagedCheckpoint(f"{path} is empty: it should name the newest checkpoint folder (step-N)")
    if not re.fullmatch(r"step-\d+", name):
        raise DamagedCheckpoint(f"{path} holds {held[:40]!r}, not a checkpoint folder's name (step-N)")
    return name


def latest_checkpoint(out_dir):
    """The newest complete checkpoint of a training run, which out_dir/latest names; None if none."""
    name = read_latest(out_dir)
    if name and not os.path.isdir(os.path.join(out_dir, name)):
        raise DamagedCheckpoint(f"{os.path.join(out_dir, 'latest')} names {name}, which is not in {out_dir}")
    return name and os.path.join(out_dir, name)


def checkpoint_folder(path):
    """A checkpoint folder as is, or a training run's out_dir as its newest checkpoint (stage2.py: "out/stage1")."""
    folder = latest_checkpoint(path) or path
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{path} is neither a checkpoint (config.json + model.safetensors) nor a training "
                                "run's out_dir (a 'latest' file naming its newest checkpoint)")
    return folder


def restore_newest(out_dir, model, optimizer, stream, cfg):
    """Restore the newest checkpoint in out_dir that loads whole; returns its step, or None when there is none. What
    is damaged is named in a warning, and the checkpoint before it tried; with none intact, the error names each."""
    folders, problems = kept_checkpoints(out_dir)
    for folder in folders:
        try:
            loaded = load_checkpoint(folder)
        except DamagedCheckpoint as damage:
            problems.append(str(damage))
            continue
        found = set(gather_from_ranks(folder))
        if len(found) > 1:  # ranks resumed from different checkpoints would train diverging copies of the model
            raise DamagedCheckpoint(f"the ranks found different checkpoints intact in {out_dir}: {sorted(found)}")
        for problem in problems:
            log(f"warning: {problem}")
        if problems:
            log(f"warning: resuming from {folder}, the newest intact checkpoint")
        return restore(folder, model, optimizer, stream, cfg, loaded)
    if problems:
        raise DamagedCheckpoint(f"no intact checkpoint to resume from in {out_dir}: {'; '.join(problems)}")
    return None


def kept_checkpoints(out_dir):
    """(folders a resume may start from, newest first; what is wrong with `latest`). The folders: the one `latest`
    names and those before it (a later one is an earlier run's); with `latest` unreadable, every step-N folder,
    each of which was written whole before it was renamed so."""
    try:
        newest, problems = read_latest(out_dir), []
    except DamagedCheckpoint as damage:
        newest, problems = None, [str(damage)]
    if newest is None and not problems:
        return [], []  # nothing saved yet
    steps = sorted((int(name[5:]) for name in os.listdir(out_dir) if re.fullmatch(r"step-\d+", name)), reverse=True)
    if newest:
        if int(newest[5:]) not in steps:
            problems.append(f"{os.path.join(out_dir, 'latest')} names {newest}, which is not in {out_dir}")
        steps = [step for step in steps if step <= int(newest[5:])]
    return [os.path.join(out_dir, f"step-{step:07d}") for step in steps], problems


def load_checkpoint(folder):
    """(trainer state, weights) of a checkpoint, each checked: damage is a DamagedCheckpoint naming the file."""
    path = os.path.join(folder, "trainer.pt")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, its directory last: a cut file has none
        raise DamagedCheckpoint(f"{path} is " + ("cut short, or not written by torch.save" if os.path.exists(path)
                                                 else "missing"))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # data, never code
    except pickle.UnpicklingError:  # torch's message would offer to run the file's code: never for a checkpoint
        raise DamagedCheckpoint(f"{path} holds more than tensors and plain data, so it is not loaded: a trainer "
                                "state is data, never code") from None
    except Exception as error:  # truncated, or not torch's format: torch's own message names no file
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise DamagedCheckpoint(f"{path} is damaged ({reason})") from None
    if not isinstance(state, dict) or not {"step", "optimizer", "ranks", "config"} <= state.keys():
        raise DamagedCheckpoint(f"{path} is not a trainer state of train.py (step, optimizer, ranks and config)")
    try:
        weights = VLM.load(folder).state_dict()
    except Exception as error:  # a truncated model.safetensors, a damaged config.json
        raise DamagedCheckpoint(f"{folder}: the weights do not load ({error})") from error
    return state, weights


def save_checkpoint(cfg, model, tokenizer, optimizer, step, data_position):
    """Rank 0 writes it, with each rank's data position and random streams (one that skips bad samples reads ahead);
    returns its folder."""
    ranks = gather_from_ranks({"data": data_position, "rng": rng_state()})
    if rank() == 0:
        write_checkpoint(cfg, model, tokenizer, optimizer, step, ranks)
    if dist.is_initialized():
        dist.barrier()
    return os.path.join(cfg["out_dir"], f"step-{step:07d}")


def write_checkpoint(cfg, model, tokenizer, optimizer, step, ranks):
    out_dir, name = cfg["out_dir"], f"step-{step:07d}"
    folder, partial = os.path.join(out_dir, name), os.path.join(out_dir, name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    writing = os.path.join(partial, "model.safetensors")  # named if the disk fills up
    try:
        model.save(partial, tokenizer=tokenizer)
        writing = os.path.join(partial, "trainer.pt")
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "ranks": ranks, "config": cfg}, writing)
        for file in os.listdir(partial):  # a power cut may lose this checkpoint, never leave `latest` naming lost files
            writing = os.path.join(partial, file)
            with open(writing, "rb") as f:
                os.fsync(f.fileno())
    except Exception as error:
        if not disk_full(error, out_dir):
            raise
        shutil.rmtree(partial, ignore_errors=True)  # the space it took back, for whatever else runs there
        raise OSError(errno.ENOSPC, f"no space left on the device writing {writing}; {out_dir}/latest is "
                                    "unchanged: make room, then resume with --resume=True") from error
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


def disk_full(error, folder):
    """Whether a write failed for want of space: torch.save then says "unexpected pos", safetensors "I/O error"."""
    return getattr(error, "errno", None) == errno.ENOSPC or shutil.disk_usage(folder).free < 2**20


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


def restore(folder, model, optimizer, stream, cfg, loaded=None):
    """Weights, optimizer moments, and this rank's random streams and data position (`loaded`: load_checkpoint's);
    returns the step. The optimizer's settings (learning rates, weight decay, betas, fused) stay this run's: a resume
    may change them."""
    state, weights = loaded or load_checkpoint(folder)
    if len(state["ranks"]) != world_size():
        raise ValueError(f"{folder} was saved by {len(state['ranks'])} rank(s), not {world_size()}: resume on as "
                         "many, or the data would not continue where it stopped")
    model.load_state_dict(weights)
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

"""Checkpoints: the weights VLM.load reads and what an exact resume needs (optimizer, every rank's data position and
random streams): written to step-N.partial, renamed step-N, named in out_dir/latest, each on disk before the next.
A resume takes the newest of them that loads whole (kept: the newest two), and says which it passed over and why.
Under FSDP each rank also writes its shard of the weights and AdamW moments into the folder's sharded/
(torch.distributed.checkpoint, DCP), which a resume on any number of ranks reads back resharded."""
import contextlib
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
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict

import data
from distributed import gather_from_ranks, is_sharded, log, rank, world_size
from model import VLM

SHARDS = "sharded"  # an FSDP checkpoint's DCP folder: every rank's shard of the weights and AdamW moments


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
    """(trainer state, weights) of a checkpoint, each checked: damage is a DamagedCheckpoint naming the file. An FSDP
    checkpoint's weights are read from its shards when restored (None here): its model.safetensors is checked whole,
    and sharded/ for every file its .metadata names, each as long as that says."""
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
    if "sharded" in state:
        check_shards(folder)
    try:
        weights = None if "sharded" in state else VLM.load(folder).state_dict()
        if weights is None:  # every rank reading the whole weights would take each rank a whole model's memory
            with safe_open(os.path.join(folder, "model.safetensors"), "pt"):  # the header, and the file's length
                pass
    except Exception as error:  # a truncated model.safetensors, a damaged config.json
        raise DamagedCheckpoint(f"{folder}: the weights do not load ({error})") from error
    return state, weights


def check_shards(folder):
    """An FSDP checkpoint's sharded/ as DCP wrote it: its .metadata, written once every rank had written its shard,
    and each file that names, at least as long as it says."""
    path = os.path.join(folder, SHARDS)
    try:
        metadata = ShardReader(path).read_metadata()
    except DamagedCheckpoint:
        raise
    except Exception as error:  # missing (a rank did not finish), cut short
        raise DamagedCheckpoint(f"{os.path.join(path, '.metadata')} does not load ({type(error).__name__}: {error})") \
            from None
    for info in metadata.storage_data.values():
        file = os.path.join(path, info.relative_path)
        if not os.path.isfile(file) or os.path.getsize(file) < info.offset + info.length:
            raise DamagedCheckpoint(f"{file} is " + ("cut short" if os.path.isfile(file) else "missing"))


class ShardReader(FileSystemReader):
    """DCP's reader of a sharded/ folder, except that its .metadata, a pickle, is read as data (MetadataUnpickler):
    DCP's own reader would run whatever code a pickle holds."""

    def read_metadata(self, *args, **kwargs):
        with open(os.path.join(self.path, ".metadata"), "rb") as f:
            metadata = MetadataUnpickler(f).load()
        metadata.storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
        return metadata


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata and nothing else: its classes, torch sizes, dtypes and layouts, paths."""
    allowed = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
               ("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        found = super().find_class(module, name) if module.startswith(("torch", "pathlib", "collections")) else None
        dcp_class = module == "torch.distributed.checkpoint.metadata" and isinstance(found, type)
        if (module, name) in self.allowed or dcp_class or isinstance(found, torch.dtype):
            return found
        raise DamagedCheckpoint(f"a checkpoint's .metadata names {module}.{name}, which DCP's metadata never holds: "
                                "it is not loaded (a checkpoint is data, never code)")


def save_checkpoint(cfg, model, tokenizer, optimizer, step, data_position):
    """Rank 0 writes it, with each rank's data position and random streams (one that skips bad samples reads ahead);
    returns its folder."""
    ranks = gather_from_ranks({"data": data_position, "rng": rng_state()})
    if is_sharded(next(model.parameters())):
        write_sharded_checkpoint(cfg, model, tokenizer, optimizer, step, ranks)
    elif rank() == 0:
        write_checkpoint(cfg, model, tokenizer, optimizer, step, ranks)
    if dist.is_initialized():
        dist.barrier()
    return os.path.join(cfg["out_dir"], f"step-{step:07d}")


def write_checkpoint(cfg, model, tokenizer, optimizer, step, ranks):
    """Rank 0 writes the checkpoint of a whole model (one process, or DDP's copy)."""
    out_dir, partial = cfg["out_dir"], fresh_partial(cfg["out_dir"], step)
    with full_disk_named(out_dir, partial) as writing:
        writing.append(os.path.join(partial, "model.safetensors"))
        model.save(partial, tokenizer=tokenizer)
        writing.append(os.path.join(partial, "trainer.pt"))
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "ranks": ranks, "config": cfg}, writing[-1])
        sync_files(partial, writing)
    publish(out_dir, step)


def write_sharded_checkpoint(cfg, model, tokenizer, optimizer, step, ranks):
    """Every rank writes its shard of the weights and AdamW moments into sharded/ (DCP: a file per rank, and
    .metadata, by rank 0 once every rank has written its file); rank 0 the whole weights, gathered from the shards,
    as one model.safetensors (what sample.py, eval.py and the next stage read), and the trainer state (the optimizer's
    groups: moments are in the shards). Then rank 0 renames the folder and names it in `latest`, as write_checkpoint."""
    out_dir, partial = cfg["out_dir"], partial_path(cfg["out_dir"], step)
    if rank() == 0:
        fresh_partial(out_dir, step)
    dist.barrier()
    weights, optimizer_state = get_state_dict(model, optimizer)
    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # rank 0's
    trainer = {"step": step, "optimizer": {"param_groups": optimizer_state["param_groups"]}, "ranks": ranks,
               "config": cfg, "sharded": SHARDS}
    with full_disk_named(out_dir, partial) as writing:
        writing.append(os.path.join(partial, SHARDS))
        dcp.save({"model": weights, "optimizer": optimizer_state["state"]}, checkpoint_id=writing[-1])  # files fsynced
        if rank() == 0:
            writing.append(os.path.join(partial, "model.safetensors"))
            model.save(partial, tokenizer=tokenizer, state=whole)
            writing.append(os.path.join(partial, "trainer.pt"))
            torch.save(trainer, writing[-1])
            sync_files(partial, writing)
            flush_entries(os.path.join(partial, SHARDS))
    if rank() == 0:
        publish(out_dir, step)


def partial_path(out_dir, step):
    """Where step N's checkpoint is written before it is complete: step-N.partial."""
    return os.path.join(out_dir, f"step-{step:07d}.partial")


def fresh_partial(out_dir, step):
    """step-N.partial, emptied of what an interrupted write left there; returns its path."""
    partial = partial_path(out_dir, step)
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    return partial


@contextlib.contextmanager
def full_disk_named(out_dir, partial):
    """Yields a list to which the writer appends each file before it writes it: if the disk fills up, the error
    names the last, and the partial checkpoint is removed, its space given back for whatever else runs there."""
    writing = [partial]
    try:
        yield writing
    except Exception as error:
        if not disk_full(error, out_dir):
            raise
        shutil.rmtree(partial, ignore_errors=True)
        raise OSError(errno.ENOSPC, f"no space left on the device writing {writing[-1]}; {out_dir}/latest is "
                                    "unchanged: make room, then resume with --resume=True") from error


def sync_files(partial, writing):
    """The folder's files on disk: a power cut may lose this checkpoint, never leave `latest` naming lost files."""
    for file in os.listdir(partial):
        writing.append(os.path.join(partial, file))
        if os.path.isfile(writing[-1]):  # sharded/: DCP synced its files itself
            with open(writing[-1], "rb") as f:
                os.fsync(f.fileno())


def publish(out_dir, step):
    """Rename step-N.partial to step-N and name it in `latest`, each on disk before the next; prune older ones."""
    name = f"step-{step:07d}"
    folder, partial = os.path.join(out_dir, name), partial_path(out_dir, step)
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
    ranks = rank_states(folder, state["ranks"])
    saved = state["optimizer"]
    trained, training = (list(dict.fromkeys(group["name"] for group in groups))  # the modules, each once
                         for groups in (saved["param_groups"], optimizer.param_groups))
    if trained != training:
        raise ValueError(f"{folder} trained {', '.join(trained)}, this run would train {', '.join(training)}: a resume "
                         "trains what the checkpoint trained, so each learning rate stays 0 or non-0 as it was; to "
                         f"change which modules train, start a new out_dir with --init_from={folder}")
    saved_sharded, sharded = "sharded" in state, is_sharded(next(model.parameters()))
    if saved_sharded != sharded:
        raise ValueError(f"{folder} was saved with distributed={'fsdp' if saved_sharded else 'ddp'!r}: resume with "
                         f"it, or start a new out_dir with --init_from={folder} (its weights, fresh AdamW moments)")
    if sharded:
        restore_shards(folder, model, optimizer)
    else:
        model.load_state_dict(weights)
        saved["param_groups"] = [{**this_run, "params": group["params"]} for this_run, group
                                 in zip(optimizer.state_dict()["param_groups"], saved["param_groups"])]
        optimizer.load_state_dict(saved)
    stream.load_state_dict(ranks[rank()]["data"])
    set_rng_state(ranks[rank()]["rng"])
    changed = ", ".join(sorted(k for k, v in state["config"].items() if k != "resume" and cfg.get(k, v) != v))
    log(f"resumed from {folder} at step {state['step']}" + (f"; changed since: {changed}" if changed else ""))
    return state["step"]


def restore_shards(folder, model, optimizer):
    """Weights and AdamW moments from an FSDP checkpoint's shards, however many ranks wrote them: DCP reads into
    this run's shards whatever parts of the saved ones they overlap. The optimizer's settings stay this run's."""
    weights, optimizer_state = get_state_dict(model, optimizer)  # this run's layout (moments made, at learning rate 0)
    dcp.load({"model": weights, "optimizer": optimizer_state["state"]},
             storage_reader=ShardReader(os.path.join(folder, SHARDS)))
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state)


def rank_states(folder, saved):
    """Each rank's data position and random streams to resume with: as saved, on as many ranks; on another number,
    the data positions moved to that many (data.reshard_positions) and rank r given the random streams of saved
    rank r mod their number. Stage 0's noise, drawn per step and rank (train.py), then falls on other samples."""
    if len(saved) == world_size():
        return saved
    try:
        positions = data.reshard_positions([state["data"] for state in saved], world_size())
    except ValueError as error:
        raise ValueError(f"{folder} was saved by {len(saved)} rank(s), not {world_size()}: {error}") from None
    return [{"data": position, "rng": saved[r % len(saved)]["rng"]} for r, position in enumerate(positions)]


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

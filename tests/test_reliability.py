"""Reliability (issue 21): a preempted run saves the step it is in and exits 75, and its resume loses no step, alone
and under torchrun; a damaged checkpoint is named and the one before it taken; degenerate settings are refused
before training, a full disk is named. Runs: train.py on tests/test_train.py's tiny models, through the command line."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import checkpoints
import distributed
import train
from configurator import merged
from test_train import ROOT, TINY, run_train, tiny_setup

COMMON = dict(max_steps=6, checkpoint_interval=2, vision_lr=1e-3, projector_lr=1e-3, language_lr=1e-3)
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531")
PYTHON_WITH_A_SIGNAL_IN_THE_WRITE = ("-c", """
import os, runpy, signal, sys, torch
save = torch.save
def save_after_a_signal(state, file):  # the step-2 checkpoint's trainer.pt: the signal comes in the middle of the write
    if str(getattr(file, "name", file)).endswith(os.path.join("step-0000002.partial", "trainer.pt")):
        os.kill(os.getpid(), signal.SIGUSR1)
    save(state, file)
torch.save = save_after_a_signal
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
""")


def start_train(out_dir, launcher=(sys.executable,), **overrides):
    args = [f"--{k}={v!r}" for k, v in {**TINY, "out_dir": str(out_dir), **overrides}.items()]
    return subprocess.Popen([*launcher, os.path.join(ROOT, "train.py"), os.path.join(ROOT, "config", "demo.py"), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def wait_for_steps(out_dir, n, process):
    """Until the run has logged n steps (it is in step n + 1 then)."""
    deadline = time.time() + 300
    while not (os.path.exists(os.path.join(out_dir, "metrics.jsonl")) and len(logged(out_dir)) >= n):
        assert process.poll() is None and time.time() < deadline, process.communicate()[0]
        time.sleep(0.02)


def worker_pid(launcher_pid, rank):
    """torchrun's worker process of `rank`: a child of the launcher with RANK=rank in its environment (Linux /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                environment = f.read().split(b"\0")
        except OSError:  # a process that ended meanwhile, or not ours to read
            continue
        if parent == launcher_pid and f"RANK={rank}".encode() in environment:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} under process {launcher_pid}")


def assert_preempted_at_its_step(out_dir, process, line, ranks=1, max_steps=COMMON["max_steps"]):
    """The run exited 75 (under torchrun: each rank did, torchrun 1) with `line`, after step k < max_steps, whose
    checkpoint `latest` names; returns k."""
    output = process.communicate(timeout=300)[0]
    if ranks == 1:
        assert process.returncode == 75, output
    else:  # torchrun fails itself, naming the exit status of the workers that ended first (both, or one of them)
        assert process.returncode == 1 and set(re.findall(r"exitcode  : (\S+)", output)) == {"75"}, output
    assert distributed.PREEMPTED == 75
    stopped = len(logged(out_dir))
    assert 1 <= stopped < max_steps
    folder = os.path.join(out_dir, f"step-{stopped:07d}")
    assert (f"{line}: stopped after step {stopped} of {max_steps}, saved in {folder}; to go on, run the same command "
            "with --resume=True") in output
    assert checkpoints.latest_checkpoint(str(out_dir)) == folder
    state, _ = checkpoints.load_checkpoint(folder)
    assert state["step"] == stopped and len(state["ranks"]) == ranks  # each rank's data position and random streams
    return stopped


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run the others must repeat: its out_dir (checkpoints of steps 4 and 6 kept) and log."""
    out_dir = tmp_path_factory.mktemp("whole")
    return out_dir, run_train(out_dir, **COMMON)


# --- preemption ---------------------------------------------------------------------------------------------------

def test_sigterm_mid_step_saves_that_step_and_the_resume_loses_none(tmp_path, whole):
    """SIGTERM in the middle of a run (not at a checkpoint step: checkpoint_interval 1000) ends it after the step it
    was in, with a checkpoint of that step, exit status 75 and a line saying how to go on; --resume=True then gives
    the uninterrupted run's losses, each step logged once."""
    process = start_train(tmp_path, **{**COMMON, "checkpoint_interval": 1000})
    wait_for_steps(tmp_path, 2, process)
    process.send_signal(signal.SIGTERM)
    assert_preempted_at_its_step(tmp_path, process, "preempted (SIGTERM)")
    resumed = run_train(tmp_path, resume=True, **COMMON)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in whole[1]]


def test_a_signal_during_a_checkpoint_write_lets_the_write_finish(tmp_path, whole):
    """The handler only takes note: SIGUSR1 (preempt_signal's default) in the middle of step 2's checkpoint write
    leaves that checkpoint whole and named by `latest`; the run stops after step 3, saved too, and resumes exactly."""
    process = start_train(tmp_path, launcher=(sys.executable, *PYTHON_WITH_A_SIGNAL_IN_THE_WRITE), **COMMON)
    assert assert_preempted_at_its_step(tmp_path, process, "preempted (SIGUSR1)") == 3
    assert checkpoints.load_checkpoint(str(tmp_path / "step-0000002"))[0]["step"] == 2
    assert not any(name.endswith(".partial") for name in os.listdir(tmp_path))
    resumed = run_train(tmp_path, resume=True, **COMMON)
    assert [m["loss"] for m in resumed] == [m["loss"] for m in whole[1]]


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="finds torchrun's workers through Linux's /proc")
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """2 gloo ranks; SIGTERM reaches rank 1 only. The stop flag rides on the step's all-reduce, so both ranks
    finish the same step, save it together (each rank's data position in the checkpoint) and exit 75; the resume
    under torchrun repeats the uninterrupted run's losses. (30 steps: each takes some 30 ms here, so the signal
    lands long before the end.)"""
    common = {**COMMON, "max_steps": 30}
    uninterrupted = run_train(tmp_path / "whole", launcher=TORCHRUN, **common)
    process = start_train(tmp_path / "stopped", launcher=TORCHRUN, **{**common, "checkpoint_interval": 1000})
    wait_for_steps(tmp_path / "stopped", 1, process)
    rank_1 = worker_pid(process.pid, rank=1)
    wait_for_steps(tmp_path / "stopped", 2, process)
    os.kill(rank_1, signal.SIGTERM)
    assert_preempted_at_its_step(tmp_path / "stopped", process, "preempted (a signal to another rank)", ranks=2,
                                 max_steps=30)
    resumed = run_train(tmp_path / "stopped", launcher=TORCHRUN, resume=True, **common)
    assert [m["loss"] for m in resumed] == [m["loss"] for m in uninterrupted]


def test_a_preempt_signal_that_cannot_be_caught_is_refused():
    for name in ("SIGBOGUS", "SIGKILL", "KILL"):
        with pytest.raises(ValueError, match=f"preempt_signal='{name}' is not a signal a program can catch"):
            distributed.catch_preemption(name)


# --- damaged checkpoints ------------------------------------------------------------------------------------------

def cut_in_half(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def latest_holding(held):
    """`latest` holds these bytes, and step 6 is as a crash in the middle of its checkpoint write leaves it."""
    def harm(out_dir):
        os.rename(out_dir / "step-0000006", out_dir / "step-0000006.partial")
        (out_dir / "latest").write_bytes(held)
    return harm


DAMAGE = {  # what is done to a copy of the uninterrupted run's out_dir, and what the warning says of it
    "latest holds bytes": (latest_holding(b"\x89PNG\r\n\x1a\n\x00\xff"),
                           r"latest holds b'\\x89PNG.*', not a checkpoint folder's name"),
    "latest is empty": (latest_holding(b""), "latest is empty"),
    "weights cut short": (lambda out_dir: cut_in_half(out_dir / "step-0000006" / "model.safetensors"),
                          "step-0000006: the weights do not load"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_resume_passes_over_damage_to_the_checkpoint_before(tmp_path, whole, damage):
    """A damaged `latest`, or a newest checkpoint cut short, is named in a warning; the resume starts from the
    previous kept checkpoint (step 4) and repeats the uninterrupted run's steps 5 and 6, as a resume from step 4
    does by hand (test_train.test_resume_reproduces_the_uninterrupted_run)."""
    shutil.copytree(whole[0], tmp_path / "run")
    harm, warning = DAMAGE[damage]
    harm(tmp_path / "run")
    process = start_train(tmp_path / "run", resume=True, **COMMON)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    assert re.search("warning: .*" + warning, output)
    assert f"resumed from {tmp_path / 'run' / 'step-0000004'} at step 4" in output
    resumed = logged(tmp_path / "run")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in whole[1]]


def two_checkpoints(out_dir):
    """Checkpoints of steps 1 and 2 in out_dir, written in this process; the cfg, model, optimizer and stream."""
    cfg, tokenizer, model, _, optimizer = tiny_setup(out_dir=str(out_dir))
    stream = train.open_stream(cfg, tokenizer, model)
    for step in (1, 2):
        checkpoints.save_checkpoint(cfg, model, tokenizer, optimizer, step, stream.state_dict())
    return cfg, model, optimizer, stream


TRAINER_DAMAGE = {  # trainer.pt of the newest checkpoint, and what is said of it
    "cut short": (cut_in_half, "trainer.pt is cut short, or not written by torch.save"),
    "foreign": (lambda path: torch.save({"model": torch.nn.Linear(2, 2)}, path),
                "trainer.pt holds more than tensors and plain data, so it is not loaded"),
    "not a trainer state": (lambda path: torch.save(torch.zeros(3), path), "trainer.pt is not a trainer state"),
    "missing": (os.remove, "trainer.pt is missing"),
}


@pytest.mark.parametrize("damage", TRAINER_DAMAGE)
def test_a_damaged_trainer_state_is_named_and_the_checkpoint_before_taken(tmp_path, capsys, damage):
    """torch's own messages name no file, and one offers to load the file as code (weights_only=False): never that."""
    cfg, model, optimizer, stream = two_checkpoints(tmp_path)
    harm, said = TRAINER_DAMAGE[damage]
    harm(tmp_path / "step-0000002" / "trainer.pt")
    assert checkpoints.restore_newest(str(tmp_path), model, optimizer, stream, cfg) == 1
    log = capsys.readouterr().out
    assert f"warning: {tmp_path / 'step-0000002' / said}" in log and f"resuming from {tmp_path / 'step-0000001'}" in log
    harm(tmp_path / "step-0000001" / "trainer.pt")  # none intact: an error naming each
    with pytest.raises(checkpoints.DamagedCheckpoint, match="no intact checkpoint to resume from") as error:
        checkpoints.restore_newest(str(tmp_path), model, optimizer, stream, cfg)
    assert str(tmp_path / "step-0000001" / said) in str(error.value) and "weights_only" not in str(error.value)


def test_latest_naming_a_missing_folder_falls_back_to_the_folder_before_it(tmp_path, capsys):
    """`latest` names step 3, which is gone: the newest kept checkpoint below it is taken; a later step's folder (an
    earlier run's, in the same out_dir) is not."""
    cfg, model, optimizer, stream = two_checkpoints(tmp_path)
    shutil.copytree(tmp_path / "step-0000002", tmp_path / "step-0000009")
    (tmp_path / "latest").write_text("step-0000003")
    assert checkpoints.restore_newest(str(tmp_path), model, optimizer, stream, cfg) == 2
    assert f"warning: {tmp_path / 'latest'} names step-0000003, which is not in {tmp_path}" in capsys.readouterr().out


@pytest.mark.parametrize("held, said", [(b"\x00\x01\xfe", r"holds b'\\x00\\x01\\xfe', not a checkpoint folder's name"),
                                        (b"\n", "is empty"), (b"step-0000009", "names step-0000009, which is not in")],
                         ids=["bytes", "empty", "a missing folder"])
def test_checkpoint_folder_names_a_damaged_latest(tmp_path, held, said):
    """--init_from, sample.py and eval.py take a run's out_dir as the checkpoint its `latest` names."""
    two_checkpoints(tmp_path)
    (tmp_path / "latest").write_bytes(held)
    with pytest.raises(checkpoints.DamagedCheckpoint, match=re.escape(str(tmp_path / "latest")) + " " + said):
        checkpoints.checkpoint_folder(str(tmp_path))


# --- settings and the disk ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["micro_batch", "global_batch", "checkpoint_interval"])
def test_a_count_of_zero_is_refused_before_training(key):
    """micro_batch=0 divided by zero, checkpoint_interval=0 too (after a step had trained), global_batch=0 trained
    "30 steps of 0 samples" and exited 0."""
    with pytest.raises(ValueError, match=f"{key}=0: .* so it must be at least 1"):
        train.check_runs([merged(train.settings, {**TINY, key: 0}, "test")])


def raises(error):
    def fail(*args, **kwargs):
        raise error
    return fail


FULL_DISK = {  # what the writer raises when the disk is full, whether the disk then shows no room left, the file named
    "torch.save, ENOSPC": ("torch.save", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), False, "trainer.pt"),
    "torch.save, its own words": ("torch.save", RuntimeError("unexpected pos 802304 vs 802196"), True, "trainer.pt"),
    "safetensors": ("model.VLM.save", RuntimeError("Error while serializing: I/O error: No space left on device (os "
                                                   "error 28)"), True, "model.safetensors"),
}


@pytest.mark.parametrize("case", FULL_DISK)
def test_a_full_disk_is_named_and_latest_stays(tmp_path, monkeypatch, case):
    """A full disk said "unexpected pos 802304 vs 802196" (torch.save to a path). Now: the file it was writing,
    `latest` still the checkpoint before, and the half-written one removed, its space given back. (Checked on a
    full tmpfs too: torch.save and safetensors fail there as these do.)"""
    where, error, no_room_left, file = FULL_DISK[case]
    cfg, tokenizer, model, _, optimizer = tiny_setup(out_dir=str(tmp_path))
    checkpoints.save_checkpoint(cfg, model, tokenizer, optimizer, 1, {})
    monkeypatch.setattr(where, raises(error))
    if no_room_left:
        monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(total=2**30, used=2**30, free=0))
    with pytest.raises(OSError, match="no space left on the device writing " +
                       re.escape(str(tmp_path / "step-0000002.partial" / file))) as raised:
        checkpoints.save_checkpoint(cfg, model, tokenizer, optimizer, 2, {})
    assert raised.value.errno == errno.ENOSPC and raised.value.__cause__ is error
    assert checkpoints.latest_checkpoint(str(tmp_path)) == str(tmp_path / "step-0000001")
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-0000001"]


def test_another_failed_write_is_not_called_a_full_disk(tmp_path, monkeypatch):
    cfg, tokenizer, model, _, optimizer = tiny_setup(out_dir=str(tmp_path))
    monkeypatch.setattr("torch.save", raises(PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(PermissionError, match="Permission denied"):
        checkpoints.save_checkpoint(cfg, model, tokenizer, optimizer, 1, {})

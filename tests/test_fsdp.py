"""distributed = "fsdp" (issue 20): FSDP2 trains what DDP and one process train, freezes what they freeze, and its
sharded checkpoints (torch.distributed.checkpoint) resume exactly on as many ranks and continue on another number;
the model.safetensors it writes is the whole of the shards. Runs: train.py through the command line on
tests/test_train.py's tiny models, 2 gloo processes under torchrun."""
import json
import math
import os
import pickle
import shutil
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

import checkpoints
from test_train import ROOT, TINY, final_weights, run_train, tiny_setup

COMMON = dict(max_steps=4, checkpoint_interval=2, micro_batch=2, vision_lr=1e-3, projector_lr=1e-3, language_lr=1e-3)
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29561")
LAUNCHERS = {1: (sys.executable,), 2: TORCHRUN}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three uninterrupted runs of the same 4 steps (global batch 8), checkpoints at steps 2 and 4: one process, DDP
    on 2 ranks, FSDP on 2 ranks. name -> (out_dir, metrics)."""
    root = tmp_path_factory.mktemp("fsdp")
    settings = {"single": (1, "ddp"), "ddp": (2, "ddp"), "fsdp": (2, "fsdp")}
    return {name: (root / name, run_train(root / name, launcher=LAUNCHERS[ranks], distributed=kind, **COMMON))
            for name, (ranks, kind) in settings.items()}


def assert_same_run(a, b, weights_tolerance=1e-5):
    """The same losses (rel. 1e-5) and final weights, of two runs (out_dir, metrics)."""
    assert [m["step"] for m in a[1]] == [m["step"] for m in b[1]]
    for x, y in zip(a[1], b[1]):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5), (x["loss"], y["loss"])
    first, second = final_weights(a[0]), final_weights(b[0])
    worst = max((first[n] - second[n]).abs().max().item() for n in first)
    assert worst < weights_tolerance, f"max weight difference {worst:.2e}"


def test_fsdp_trains_as_ddp_and_one_process(runs):
    """The same global batch of 8: 1 process x 4 micro-batches of 2, or 2 ranks x 2, DDP or FSDP (each micro-batch's
    gradients reduce-scattered into the shards, clipped by the norm over all of them)."""
    assert_same_run(runs["single"], runs["ddp"])
    assert_same_run(runs["single"], runs["fsdp"])
    assert runs["fsdp"][1][-1]["loss"] < runs["fsdp"][1][0]["loss"]  # it trains


def sharded_weights(folder):
    """The weights in a checkpoint's shards, read by DCP into whole tensors (no process group: one reader)."""
    state = {"model": {n: torch.empty_like(t) for n, t in load_file(os.path.join(folder, "model.safetensors")).items()}}
    dcp.load(state, storage_reader=checkpoints.ShardReader(os.path.join(folder, checkpoints.SHARDS)))
    return state["model"]


def test_the_whole_weights_file_is_the_shards_gathered(runs):
    """model.safetensors (what sample.py, eval.py and the next stage read) holds every tensor whole, equal to the
    shards that 2 ranks wrote, the tied output layer once."""
    folder = checkpoints.latest_checkpoint(str(runs["fsdp"][0]))
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "sharded", "tokenizer.json", "trainer.pt"]
    assert sorted(os.listdir(os.path.join(folder, "sharded"))) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    whole, shards = load_file(os.path.join(folder, "model.safetensors")), sharded_weights(folder)
    assert "language.lm_head.weight" not in whole
    assert all(torch.equal(whole[n], shards[n]) for n in whole)
    unsharded_shapes = {n: t.shape for n, t in tiny_setup()[2].state_dict().items()}
    assert {n: t.shape for n, t in whole.items()} == {n: s for n, s in unsharded_shapes.items() if "lm_head" not in n}


def resumed_from(run, tmp_path, step, ranks, half_written=None, **changes):
    """What a crash after `step`'s checkpoint leaves (that checkpoint, the log up to step + 1; `half_written`: a
    later checkpoint's folder as a kill in the middle of its writing leaves it), resumed on `ranks`."""
    out_dir, metrics = run
    os.makedirs(tmp_path)
    name = f"step-{step:07d}"
    shutil.copytree(out_dir / name, tmp_path / name)
    if half_written:
        partial = tmp_path / f"step-{half_written:07d}.partial"
        shutil.copytree(out_dir / f"step-{half_written:07d}", partial)
        os.remove(partial / "sharded" / ".metadata")  # DCP writes it last
        with open(partial / "sharded" / "__0_0.distcp", "r+b") as f:
            f.truncate(10)
    (tmp_path / "latest").write_text(name)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics[:step + 1]))
    return tmp_path, run_train(tmp_path, launcher=LAUNCHERS[ranks], distributed="fsdp", resume=True,
                               **{**COMMON, **changes})


def test_fsdp_resume_on_as_many_ranks_is_exact(runs, tmp_path):
    """Killed while writing step 4's shards: the resume from step 2 passes over the half-written folder, writes step
    4 afresh, and ends with the uninterrupted run's losses and weights."""
    resumed = resumed_from(runs["fsdp"], tmp_path / "resumed", step=2, ranks=2, half_written=4)
    assert not os.path.exists(resumed[0] / "step-0000004.partial")
    assert [m["step"] for m in resumed[1]] == [1, 2, 3, 4]
    assert [m["loss"] for m in resumed[1]] == [m["loss"] for m in runs["fsdp"][1]]
    a, b = final_weights(runs["fsdp"][0]), final_weights(resumed[0])
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_sharded_checkpoint_continues_on_another_number_of_ranks(runs, tmp_path):
    """DCP reads the shards of 2 ranks into 1, and each rank's data position moves with them
    (data.reshard_positions): steps 3-4 on 1 rank repeat the 2-rank run's losses. That run's step-3 checkpoint,
    written by 1 rank, goes on on 2: step 4 once more."""
    on_one = resumed_from(runs["fsdp"], tmp_path / "on_one", step=2, ranks=1, checkpoint_interval=1)
    assert_same_run(runs["fsdp"], on_one)
    assert len(checkpoints.load_checkpoint(str(on_one[0] / "step-0000003"))[0]["ranks"]) == 1
    on_two_again = resumed_from(on_one, tmp_path / "on_two_again", step=3, ranks=2)
    assert_same_run(runs["fsdp"], on_two_again)


def test_stages_0_and_1_under_fsdp_train_the_projector_alone(tmp_path):
    """Stage 1's learning rates (vision and language 0): 2 FSDP ranks give one process's losses; the frozen towers'
    weights end as they began, and only the projector has AdamW moments, in the trainer state and in the shards.
    The output layer untied from the embedding, as Qwen2.5-7B's."""
    untied = dict(TINY["language_config"], tie_word_embeddings=False)
    stage1 = dict(COMMON, max_steps=2, vision_lr=0.0, language_lr=0.0, projector_lr=1e-2, language_config=untied)
    single = run_train(tmp_path / "single", **stage1)
    sharded = run_train(tmp_path / "fsdp", launcher=TORCHRUN, distributed="fsdp", **stage1)
    assert_same_run((tmp_path / "single", single), (tmp_path / "fsdp", sharded))
    initial, final = tiny_setup(language_config=untied)[2].state_dict(), final_weights(tmp_path / "fsdp")
    assert "language.lm_head.weight" in final
    for name, weight in final.items():
        assert torch.equal(weight, initial[name]) != name.startswith("projector."), name
    folder = checkpoints.latest_checkpoint(str(tmp_path / "fsdp"))
    state, _ = checkpoints.load_checkpoint(folder)
    assert [group["name"] for group in state["optimizer"]["param_groups"]] == ["projector", "projector"]
    metadata = checkpoints.ShardReader(os.path.join(folder, "sharded")).read_metadata()
    moments = {name.split(".")[1] for name in metadata.state_dict_metadata if name.startswith("optimizer.")}
    assert moments == {"projector"}


# --- damaged shards: a resume passes over them (checkpoints.restore_newest), as over other damage --------------

def cut_in_half(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


class Payload:
    def __reduce__(self):
        return (os.system, ("echo this ran",))


SHARD_DAMAGE = {  # what is done to a copy of a checkpoint of 2 FSDP ranks, and what load_checkpoint says of it
    "a rank's shard cut short": (lambda f: cut_in_half(f / "sharded" / "__1_0.distcp"), "__1_0.distcp is cut short"),
    "a rank's shard missing": (lambda f: os.remove(f / "sharded" / "__0_0.distcp"), "__0_0.distcp is missing"),
    "no .metadata (a rank did not finish)": (lambda f: os.remove(f / "sharded" / ".metadata"),
                                             r"\.metadata does not load \(FileNotFoundError"),
    ".metadata holds code": (lambda f: (f / "sharded" / ".metadata").write_bytes(pickle.dumps(Payload())),
                             "names posix.system, which DCP's metadata never holds"),
    "whole weights cut short": (lambda f: cut_in_half(f / "model.safetensors"), "the weights do not load"),
}


@pytest.mark.parametrize("damage", SHARD_DAMAGE)
def test_damaged_shards_are_named(runs, tmp_path, damage, capfd):
    folder = tmp_path / "step"
    shutil.copytree(checkpoints.latest_checkpoint(str(runs["fsdp"][0])), folder)
    checkpoints.load_checkpoint(str(folder))  # intact
    harm, said = SHARD_DAMAGE[damage]
    harm(folder)
    with pytest.raises(checkpoints.DamagedCheckpoint, match=said):
        checkpoints.load_checkpoint(str(folder))
    assert "this ran" not in capfd.readouterr().out


def test_cuda_graphs_are_refused_under_fsdp():
    import train
    cfg = dict(train.settings, fast_path=True, compile=True, compile_mode="reduce-overhead", distributed="fsdp")
    with pytest.raises(ValueError, match="compile_mode='reduce-overhead' with distributed='fsdp'"):
        train.setup_stage(cfg)


@pytest.mark.parametrize("size", ["1.5B", "3B", "7B"])
def test_larger_language_model_configs(size):
    """config/qwen2.5-*.py: the language model and a projector as wide as it, on top of a stage's config, which
    they leave as it was (the paper's recipe); 3B and 7B sharded, as DDP would not fit them (README's table)."""
    import bench
    import fast_path
    import train
    from configurator import configure
    stage2 = os.path.join(ROOT, "config", "stage2.py")
    recipe = configure(dict(train.settings), [stage2])
    cfg = configure(dict(train.settings), [stage2, os.path.join(ROOT, "config", f"qwen2.5-{size.lower()}.py")])
    assert cfg["language"] == f"Qwen/Qwen2.5-{size}"
    assert cfg["projector_hidden"] == bench.QWEN25[size].hidden_size
    assert cfg["distributed"] == ("ddp" if size == "1.5B" else "fsdp")
    changed = {key for key in cfg if cfg[key] != recipe[key]}
    assert changed <= {"language", "projector_hidden", "distributed", "compile_mode"}
    on_a_gpu = {**cfg, "fast_path": True, "compile": True}  # train.py's defaults on CUDA
    assert not (fast_path.uses_cuda_graphs(on_a_gpu) and fast_path.cuda_graphs_refused(on_a_gpu)), size


def test_data_positions_move_to_another_number_of_ranks_only_from_one_place():
    """After 3 steps of 8 samples, 2 ranks have taken 12 each, 1 rank would have taken 24 and 4 ranks 6: the same 24
    samples of the order. Counts go to rank 0. A rank that read ahead (a batch skipped whole) cannot be moved."""
    import data
    position = {"epoch": 1, "samples_consumed": 12, "seed": 5, "world_size": 2, "shuffle_chunks": 16,
                "counts": {"skipped": 1, "text_only": 0, "truncated": 2}}
    moved = data.reshard_positions([position, {**position, "counts": {"skipped": 0, "text_only": 3, "truncated": 0}}], 4)
    assert [(p["samples_consumed"], p["world_size"], p["epoch"]) for p in moved] == [(6, 4, 1)] * 4
    assert [p["counts"] for p in moved] == [{"skipped": 1, "text_only": 3, "truncated": 2}] + [
        {"skipped": 0, "text_only": 0, "truncated": 0}] * 3
    with pytest.raises(ValueError, match="stopped at different places in the data"):
        data.reshard_positions([position, {**position, "samples_consumed": 16}], 1)

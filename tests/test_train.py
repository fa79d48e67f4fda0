"""train.py: trainable parts and learning rates per stage, exact resumption, DDP equivalence, and a short run
that learns. Runs use the demo's synthetic shapes and tiny random models, through the real command line."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoints
import data
import masks
import train
from configurator import command_line_keys, configure, merged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {  # the demo's classes at the smallest sizes that still learn
    "vision_config": dict(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2),
    "language_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, rope_theta=10000.0, tie_word_embeddings=True),
    "projector_hidden": 32, "data_format": "synthetic", "dataset": "shapes", "shapes_samples": 256, "num_workers": 0, "stages": [], "eval_after": False,
    "global_batch": 8, "micro_batch": 4, "warmup_steps": 2, "checkpoint_interval": 1000,
}


def run_train(out_dir, launcher=(sys.executable,), **overrides):
    args = [f"--{k}={v!r}" for k, v in {**TINY, "out_dir": str(out_dir), **overrides}.items()]
    subprocess.run([*launcher, os.path.join(ROOT, "train.py"), os.path.join(ROOT, "config", "demo.py"), *args],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_weights(out_dir):
    from model import VLM
    return VLM.load(checkpoints.latest_checkpoint(str(out_dir))).state_dict()


# --- stages: what trains, at which learning rate ----------------------------------------------------------

def tiny_setup(**overrides):
    cfg = merged(train.settings, {**TINY, "device": "cpu", "dtype": "float32", "tokenizer": "shapes", **overrides}, "test")
    tokenizer, model = train.build_model(cfg)
    trainable = train.freeze_modules(model, cfg)
    optimizer = train.make_optimizer(model, cfg)
    return cfg, tokenizer, model, trainable, optimizer


# The paper's four stages (sections 3.4, 4.1 and 4.2, Tables 3 and 5): data, mask, noise, and the learning rates of
# the vision encoder, projector and language model (0: frozen)
PAPER_STAGES = {
    0: ("lmms-lab/LLaVA-ReCap-118K", "bidirectional", 0.2, 0.0, 1e-3, 0.0),
    1: ("lmms-lab/LLaVA-ReCap-118K", "prefix", 0.0, 0.0, 1e-3, 0.0),
    2: ("lmms-lab/LLaVA-ReCap-558K", "prefix", 0.0, 5e-6, 2e-3, 2e-5),
    3: ("lmms-lab/LLaVA-NeXT-Data", "prefix", 0.0, 5e-6, 1e-4, 2e-5),
}


@pytest.mark.parametrize("stage", sorted(PAPER_STAGES))
def test_each_stage_config_is_the_papers(stage):
    cfg = configure(dict(train.settings), [os.path.join(ROOT, "config", f"stage{stage}.py")])
    assert (cfg["dataset"], cfg["mask_kind"], cfg["noise_prob"], cfg["vision_lr"], cfg["projector_lr"],
            cfg["language_lr"]) == PAPER_STAGES[stage] and cfg["out_dir"] == f"out/stage{stage}"
    # every stage: batch 128, AdamW (0.9, 0.999) with weight decay 0.01, cosine decay to 1e-8, clipped gradients
    assert (cfg["global_batch"], cfg["beta1"], cfg["beta2"], cfg["weight_decay"], cfg["min_lr"]) == (128, 0.9, 0.999, 0.01, 1e-8)
    assert cfg["grad_clip"] > 0 and cfg["init_from"] == ("" if stage == 0 else f"out/stage{stage - 1}")


def test_caption_coco_config_is_the_full_shot_fine_tune_from_stage_3():
    """Table 6's COCO column is full-shot (paper 4.4): one epoch on COCO's Karpathy train + restval, every caption
    once, from stage 3, under the prefix mask, at stage 3's learning rates (the paper gives none for this fine-tune)."""
    cfg = configure(dict(train.settings), [os.path.join(ROOT, "config", "caption_coco.py")])
    stage3 = configure(dict(train.settings), [os.path.join(ROOT, "config", "stage3.py")])
    assert (cfg["data_format"], os.path.basename(cfg["dataset"]), cfg["mask_kind"], cfg["noise_prob"]) == (
        "karpathy", "dataset_coco.json", "prefix", 0.0)
    assert [cfg[f"{m}_lr"] for m in ("vision", "projector", "language")] == [stage3[f"{m}_lr"] for m in
                                                                           ("vision", "projector", "language")]
    assert (cfg["init_from"], cfg["out_dir"], cfg["epochs"], cfg["max_steps"]) == ("out/stage3", "out/caption_coco", 1, 0)
    assert (cfg["global_batch"], cfg["beta1"], cfg["beta2"], cfg["weight_decay"], cfg["min_lr"]) == (128, 0.9, 0.999, 0.01, 1e-8)
    assert cfg["image_root"] == "data/images/coco"  # eval.py's default --image_root, + the dataset's folder


def test_stage_is_not_a_setting():
    """The out_dir names a stage; its recipe is its config file. A `stage` setting that only labelled the log
    (--stage=0 alone trained stage 2's recipe) is refused like any unknown setting."""
    with pytest.raises(KeyError, match="unknown setting 'stage'"):
        configure(dict(train.settings), ["--stage=0"])


def test_a_fixed_noise_token_replaces_the_stage_0_inputs():
    """noise_token_id >= 0 makes Algorithm 1's noise that token (-1: uniformly random tokens). With every text
    input noised (noise_prob=1), a stage-0 step trains on the batch whose real text tokens are all that token,
    the labels unchanged."""
    cfg, tokenizer, model, trainable, _ = tiny_setup(mask_kind="bidirectional", noise_prob=1.0, noise_token_id=5,
                                                     vision_lr=0.0, language_lr=0.0)
    batch = next(train.endless(train.open_stream(cfg, tokenizer, model)))

    def loss(micro_batches, **changes):
        return train.train_step(model, micro_batches, {**cfg, **changes}, torch.device("cpu"), trainable)[0].item()

    text = [(b["document"] >= 0) & ~masks.image_slots(b["document"], model.n_image_tokens) for b in batch]
    all_fives = [{**b, "input_ids": torch.where(is_text, 5, b["input_ids"])} for b, is_text in zip(batch, text)]
    assert any((b["input_ids"] != 5).any() for b in batch)
    assert loss(batch) == pytest.approx(loss(all_fives, noise_prob=0.0), rel=1e-6)
    assert loss(batch, noise_token_id=-1) != loss(batch)  # random tokens instead: other inputs, another loss


@pytest.mark.parametrize("mask_kind, noise_prob", [("bidirectional", 0.2), ("prefix", 0.0)])  # stages 0 and 1
def test_stages_0_and_1_train_only_the_projector(mask_kind, noise_prob):
    cfg, tokenizer, model, trainable, optimizer = tiny_setup(mask_kind=mask_kind, noise_prob=noise_prob,
                                                             vision_lr=0.0, projector_lr=1e-2, language_lr=0.0)
    assert trainable == ["projector"]
    assert not model.vision.training and not model.language.training  # frozen modules stay in eval mode
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    batches = train.endless(train.open_stream(cfg, tokenizer, model))
    train.set_learning_rates(optimizer, 0, 10, cfg)
    train.train_step(model, next(batches), cfg, torch.device("cpu"), trainable)
    optimizer.step()
    for name, p in model.named_parameters():
        if name.startswith("projector."):
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"{name} changed although frozen"
            assert p.grad is None


def test_gradient_checkpointing_reaches_the_frozen_language_model(monkeypatch):
    """Stages 0-1 train the projector alone, but its gradient passes back through the frozen language model, whose
    activations are the stage's memory: with gradient_checkpointing its blocks are run again in the backward pass
    (the same gradient). The frozen vision tower, which no gradient crosses, runs once, as it did."""
    import model as model_module
    gradients, checkpointed = [], []
    checkpoint = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint",
                        lambda block, *args, **kwargs: checkpointed.append(type(block).__name__) or checkpoint(block, *args, **kwargs))
    for gradient_checkpointing in (False, True):
        cfg, tokenizer, model, trainable, _ = tiny_setup(vision_lr=0.0, projector_lr=1e-2, language_lr=0.0,
                                                         gradient_checkpointing=gradient_checkpointing)
        assert trainable == ["projector"] and not model.language.training
        batch = next(train.endless(train.open_stream(cfg, tokenizer, model)))
        train.train_step(model, batch, cfg, torch.device("cpu"), trainable)
        gradients.append([p.grad.clone() for p in model.projector.parameters()])
    n_micro_batches = cfg["global_batch"] // cfg["micro_batch"]
    assert checkpointed == ["Qwen2Block"] * cfg["language_config"]["num_hidden_layers"] * n_micro_batches
    for plain, recomputed in zip(*gradients):
        torch.testing.assert_close(recomputed, plain)


def test_micro_batches_divide_a_batch_without_changing_its_gradient():
    """A batch's loss is the mean over all its labelled tokens (eq. 1), however micro-batches split it: each
    micro-batch's mean counts by its share of the labels. Conversations of different lengths, so a plain mean
    of the micro-batch means would differ."""
    import data
    import shapes
    cfg, tokenizer, model, trainable, _ = tiny_setup(shapes_questions=2)
    source = shapes.SyntheticShapes(4, image_size=32, questions=2)
    samples = [data.make_sample(source.record(i), tokenizer, 32, 256, data.DEFAULT_SYSTEM_PROMPT)[0] for i in range(4)]
    assert len({sum(label != data.IGNORE_INDEX for label in s["labels"]) for s in samples}) > 1

    def loss_and_gradients(split):
        model.zero_grad()
        micro_batches, start = [], 0
        for size in split:
            micro_batches.append(data.collate(samples[start:start + size], model.n_image_tokens, tokenizer.pad_id))
            start += size
        loss = train.train_step(model, micro_batches, cfg, torch.device("cpu"), trainable)[0]
        return loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    whole_loss, whole = loss_and_gradients([4])
    for split in ([1, 3], [2, 2], [1, 1, 1, 1]):
        loss, gradients = loss_and_gradients(split)
        assert abs(loss.item() - whole_loss.item()) < 1e-5, split
        assert max((a - b).abs().max().item() for a, b in zip(gradients, whole)) < 1e-5, split


@pytest.mark.parametrize("compile_mode", ["reduce-overhead", "max-autotune"])  # the modes with CUDA graphs
def test_gradient_checkpointing_with_cuda_graphs_is_refused_up_front(compile_mode):
    """Gradient checkpointing runs the blocks again in the backward pass, which stops CUDA graph recording (on
    an H200). It is refused before anything is built, naming the setting to change."""
    cfg = merged(train.settings, {**TINY, "device": "cpu", "tokenizer": "shapes", "gradient_checkpointing": True,
                                  "fast_path": True, "compile": True, "compile_mode": compile_mode}, "test")
    with pytest.raises(ValueError, match="gradient_checkpointing.*compile_mode='default'"):
        train.train_stage(cfg)


def test_the_reference_path_compiles_nothing_whatever_compile_says(monkeypatch, tmp_path):
    """compile and compile_mode belong to the fast path: with fast_path=False the blocks stay eager, so that
    `--fast_path=False` alone gives the plain reference on a GPU too (CUDA graphs need the fast path)."""
    compiled = []
    monkeypatch.setattr(train, "compile_blocks", lambda model, mode: compiled.append(mode))
    cfg = merged(train.settings, {**TINY, "device": "cpu", "tokenizer": "shapes", "fast_path": False, "compile": True,
                                  "compile_mode": "reduce-overhead", "max_steps": 1, "checkpoint_interval": 1,
                                  "out_dir": str(tmp_path / "reference")}, "test")
    train.train_stage(cfg)
    assert compiled == []
    train.train_stage({**cfg, "fast_path": True, "compile_mode": "default", "out_dir": str(tmp_path / "fast")})
    assert compiled == ["default"]


def test_every_module_has_its_own_learning_rate_on_the_schedule():
    cfg, _, model, trainable, optimizer = tiny_setup(vision_lr=5e-6, projector_lr=2e-3, language_lr=2e-5,
                                                     warmup_steps=10, min_lr=1e-8)
    assert trainable == ["vision", "projector", "language"]
    total = 110  # 10 warm-up steps, then 100 of cosine decay
    expected_factor = {0: 1 / 10, 9: 1.0, 60: 0.5, 110: 0.0}
    for step, factor in expected_factor.items():
        train.set_learning_rates(optimizer, step, total, cfg)
        for group in optimizer.param_groups:
            base = {"vision": 5e-6, "projector": 2e-3, "language": 2e-5}[group["name"]]
            want = base * factor if step < 10 else 1e-8 + (base - 1e-8) * factor
            assert math.isclose(group["lr"], want, rel_tol=1e-9), (step, group["name"], group["lr"], want)


def test_no_weight_decay_on_biases_and_norms():
    _, _, model, _, optimizer = tiny_setup()
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            decays = group["weight_decay"] > 0
            assert decays == (p.dim() >= 2), names[id(p)]


@pytest.mark.parametrize("max_norm, clipped", [(1e-3, True), (1e3, False), (0.0, False)])  # 0: clipping is off
def test_gradients_are_clipped_to_grad_clip_and_0_turns_clipping_off(max_norm, clipped):
    """train.clip_gradients clips the total norm of the gradients the optimizer steps on to grad_clip and returns
    their norm before clipping, for the log. grad_clip = 0 means no clipping, as in nanoGPT (not gradients
    divided by infinity)."""
    torch.manual_seed(0)
    _, _, model, _, optimizer = tiny_setup(projector_lr=1e-2, language_lr=1e-2, vision_lr=1e-2)
    texts = torch.randint(0, model.config.language.vocab_size, (2, 6))
    model(**data.collate([{"pixel_values": torch.randn(3, 32, 32), "input_ids": t, "labels": t} for t in texts],
                         model.n_image_tokens, pad_id=0), mask_kind="prefix").backward()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.grad.clone() for p in params]
    norm = train.clip_gradients(optimizer, max_norm).item()
    assert norm == pytest.approx(torch.nn.utils.get_total_norm(before).item(), rel=1e-6)
    assert (0 < max_norm < norm) == clipped
    after = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
    assert after == pytest.approx(max_norm if clipped else norm, rel=1e-4)
    if not clipped:
        assert all(torch.equal(p.grad, g) for p, g in zip(params, before))


def test_random_backbones_take_the_language_models_tokenizer_when_none_is_named(tmp_path):
    """language_config makes a random Qwen2 of the given sizes; its vocabulary still comes from `language`."""
    import shapes
    shapes.shapes_tokenizer().tokenizer.save(str(tmp_path / "tokenizer.json"))
    cfg = merged(train.settings, {**TINY, "tokenizer": "", "language": str(tmp_path)}, "test")
    tokenizer, model = train.build_model(cfg)
    assert model.config.language.vocab_size == tokenizer.vocab_size == shapes.shapes_tokenizer().vocab_size


def test_global_batch_must_split_evenly():
    assert train.accumulation_steps(128, 16, 2) == 4
    with pytest.raises(ValueError, match="not a multiple"):
        train.accumulation_steps(128, 12, 1)


# --- runs through the command line ------------------------------------------------------------------------

def test_a_short_run_learns(tmp_path):
    metrics = run_train(tmp_path, max_steps=60, vision_lr=5e-3, projector_lr=5e-3, language_lr=5e-3)
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-5:]) / 5
    assert last < 0.5 * first, f"loss {first:.3f} -> {last:.3f}"
    assert os.path.exists(tmp_path / "loss.png")
    assert {"loss", "grad_norm", "lr", "images_per_s", "tokens_per_s", "skipped"} <= set(metrics[-1])


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Stage 0 (random input noise) with DataLoader workers: an interruption after step 3's checkpoint and a
    resume give the same losses and weights as one uninterrupted run, and the log holds each step once."""
    stage0 = dict(mask_kind="bidirectional", noise_prob=0.2, vision_lr=1e-3, projector_lr=1e-3,
                  language_lr=0.0, max_steps=6, checkpoint_interval=3, num_workers=1, micro_batch=4)
    whole = run_train(tmp_path / "whole", **stage0)
    # the interrupted run: what a crash during step 5 leaves on disk, the checkpoint of step 3 and the log of 4
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(tmp_path / "whole" / "step-0000003", tmp_path / "resumed" / "step-0000003")
    (tmp_path / "resumed" / "latest").write_text("step-0000003")
    (tmp_path / "resumed" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in whole[:4]))
    resumed = run_train(tmp_path / "resumed", resume=True, **stage0)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in whole]
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(a[n], b[n]) for n in a)
    from model import VLM
    # stage 0's bidirectional mask cannot be decoded under: its checkpoints caption under the prefix mask
    assert VLM.load(checkpoints.latest_checkpoint(str(tmp_path / "resumed"))).config.mask_kind == "prefix"


@pytest.mark.parametrize("packing", [{}, dict(shapes_questions=2, pack_length=152)],
                         ids=["padded", "packed"])
def test_ddp_two_processes_equal_one_process_with_twice_the_accumulation(tmp_path, packing):
    """torchrun with 2 gloo processes x 4 micro-batches of 1 sees the same 8 samples per step as 1 process x 8.
    Packed, each rank packs its own 4 conversations into rows of 152 tokens, so the ranks can run different
    numbers of micro-batches (here 3 and 4 in step 3); each still synchronises gradients once, on its last."""
    common = {**dict(max_steps=3, micro_batch=1, vision_lr=1e-3, projector_lr=1e-3, language_lr=1e-3), **packing}
    single = run_train(tmp_path / "single", **common)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517")
    double = run_train(tmp_path / "ddp", launcher=torchrun, **common)
    assert len(single) == len(double)
    for a, b in zip(single, double):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["loss"], b["loss"])
    a, b = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    assert worst < 1e-5, f"max weight difference {worst:.2e}"


def test_ddp_resume_continues_each_rank_where_it_stopped(tmp_path):
    """A rank whose whole batch is text-only (as rows of LLaVA-NeXT-Data are) takes the next one, and reads
    ahead of the other ranks from then on. A checkpoint holds every rank's data position, so a resume under
    torchrun gives each rank its own and repeats the uninterrupted run's losses."""
    from PIL import Image
    import data
    n_entries, seed = 32, 5
    _, row_ids, _ = data.shuffled_order([n_entries], seed, epoch=0)
    text_only = set(row_ids[1::2][:4].tolist())  # rank 1's first batch: 4 of its samples, every second one
    os.makedirs(tmp_path / "images")
    entries = []
    for i in range(n_entries):
        turns = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": f"Picture {i}."}]
        entries.append({"id": str(i), "conversations": turns})
        if i not in text_only:
            Image.new("RGB", (32, 32), (8 * i, 100, 200 - 6 * i)).save(tmp_path / "images" / f"{i}.png")
            entries[-1]["image"] = f"{i}.png"
    (tmp_path / "data.json").write_text(json.dumps(entries))
    common = dict(max_steps=4, checkpoint_interval=2, micro_batch=1, seed=seed, data_format="llava_json",
                  max_text_only_fraction=0.5,
                  dataset=str(tmp_path / "data.json"), image_root=str(tmp_path / "images"), vision_lr=1e-3,
                  projector_lr=1e-3, language_lr=1e-3)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518")
    whole = run_train(tmp_path / "whole", launcher=torchrun, **common)
    assert whole[-1]["text_only"] == 4  # counted over both ranks
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(tmp_path / "whole" / "step-0000002", tmp_path / "resumed" / "step-0000002")
    (tmp_path / "resumed" / "latest").write_text("step-0000002")
    resumed = run_train(tmp_path / "resumed", launcher=torchrun, resume=True, **common)
    assert [m["loss"] for m in resumed] == [m["loss"] for m in whole[2:]]


def test_a_resume_keeps_the_optimizer_state_and_takes_this_runs_settings(tmp_path):
    """The moments come from the checkpoint; learning rates and weight decay from the command line, so that
    `--resume=True --projector_lr=...` (lowering a rate after a divergence, say) does what it says."""
    cfg, tokenizer, model, _, optimizer = tiny_setup(out_dir=str(tmp_path), projector_lr=1e-3, weight_decay=0.01)
    for p in model.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    optimizer.step()
    stream = train.open_stream(cfg, tokenizer, model)
    checkpoints.save_checkpoint(cfg, model, tokenizer, optimizer, 1, stream.state_dict())
    cfg, _, model, _, optimizer = tiny_setup(out_dir=str(tmp_path), projector_lr=1e-5, weight_decay=0.1, resume=True)
    assert checkpoints.restore(checkpoints.latest_checkpoint(str(tmp_path)), model, optimizer, stream, cfg) == 1
    projector = [group for group in optimizer.param_groups if group["name"] == "projector"]
    assert [(group["base_lr"], group["weight_decay"]) for group in projector] == [(1e-5, 0.1), (1e-5, 0.0)]
    moments = [optimizer.state[p]["exp_avg"] for group in projector for p in group["params"]]
    assert moments and all(torch.allclose(m, torch.full_like(m, 0.1)) for m in moments)  # (1 - beta1) x a gradient of 1
    # which modules train is not a setting a resume may change: the moments would not match the parameters
    cfg, _, model, _, optimizer = tiny_setup(out_dir=str(tmp_path), vision_lr=0.0, resume=True)
    with pytest.raises(ValueError, match=r"step-0000001 trained vision, projector, language, this run would train "
                                         r"projector, language: .* --init_from=.*step-0000001"):
        checkpoints.restore(checkpoints.latest_checkpoint(str(tmp_path)), model, optimizer, stream, cfg)


def test_float16_without_a_loss_scaler_is_refused_before_any_stage_trains():
    runs = [merged(train.settings, {**TINY, "out_dir": f"out/{i}", "dtype": dtype}, "test")
            for i, dtype in enumerate(["float32", "float16"])]
    with pytest.raises(ValueError, match="dtype='float16'.*loss scaler"):
        train.check_runs(runs)


def test_checkpoint_is_loadable_and_complete(tmp_path):
    run_train(tmp_path, max_steps=2, checkpoint_interval=1)
    folder = checkpoints.latest_checkpoint(str(tmp_path))
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "tokenizer.json", "trainer.pt"]
    state = torch.load(os.path.join(folder, "trainer.pt"), weights_only=True)
    [this_rank] = state["ranks"]  # each rank's data position and random streams
    assert state["step"] == 2 and this_rank["data"]["samples_consumed"] > 0 and "rng" in this_rank
    assert state["optimizer"]["state"]
    assert not any(name.endswith(".partial") for name in os.listdir(tmp_path))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names open files through Linux's /proc")
def test_a_checkpoint_is_on_disk_before_latest_names_it(tmp_path, monkeypatch):
    """Against a power cut: the files, the folder's entries, and its rename into out_dir reach the disk (fsync)
    before `latest` is replaced to name it; then that rename too."""
    cfg, tokenizer, model, _, optimizer = tiny_setup(out_dir=str(tmp_path))
    events = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        fsync(descriptor)

    def recorded_replace(source, target):
        events.append(("replace", str(target)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    checkpoints.write_checkpoint(cfg, model, tokenizer, optimizer, 7, [{"data": {}, "rng": checkpoints.rng_state()}])
    out_dir = os.path.realpath(tmp_path)
    folder = os.path.join(out_dir, "step-0000007")
    assert events[-6:] == [("fsync", folder + ".partial"), ("replace", folder), ("fsync", out_dir),
                           ("fsync", os.path.join(out_dir, "latest.tmp")), ("replace", os.path.join(out_dir, "latest")),
                           ("fsync", out_dir)]
    synced_files = {path for kind, path in events[:-6] if kind == "fsync"}
    assert synced_files >= {os.path.join(folder + ".partial", name) for name in os.listdir(folder)}


def test_a_stage_starts_from_the_previous_stages_out_dir(tmp_path):
    """config/stage2.py says init_from = "out/stage1": a run's out_dir stands for its newest checkpoint, every
    weight of it (stage 1 trains the vision tower and the projector here)."""
    run_train(tmp_path / "stage1", max_steps=3, checkpoint_interval=1, vision_lr=1e-2, projector_lr=1e-2,
              language_lr=0.0)
    cfg = merged(train.settings, {**TINY, "init_from": str(tmp_path / "stage1")}, "test")
    _, model = train.build_model(cfg)
    stage1, start = final_weights(tmp_path / "stage1"), model.state_dict()
    assert stage1.keys() == start.keys() and all(torch.equal(stage1[n], start[n]) for n in stage1)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint .* nor a training run's out_dir"):
        checkpoints.checkpoint_folder(str(tmp_path))


def test_saving_keeps_this_checkpoint_and_the_one_before_and_not_an_earlier_runs_later_ones(tmp_path):
    cfg, tokenizer, model, _, optimizer = tiny_setup(out_dir=str(tmp_path))
    for stale in ("step-0001000", "step-0001500"):  # an earlier run that went further, in the same out_dir
        os.makedirs(tmp_path / stale)
    for step in (500, 501, 502):
        checkpoints.save_checkpoint(cfg, model, tokenizer, optimizer, step, data_position={})
        assert checkpoints.latest_checkpoint(str(tmp_path)) == str(tmp_path / f"step-{step:07d}")
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("step-")) == [
        "step-0000501", "step-0000502", "step-0001000", "step-0001500"]


def test_each_stage_starts_from_the_one_before_and_a_global_init_from_from_the_first():
    """--init_from with the demo's stages starts stage 0 there; stages 1-3 still start from the stage before
    (its out_dir stands for its newest checkpoint), unless a stage names its own starting point."""
    stages = [dict(out_dir="out/s0"), dict(out_dir="out/s1"), dict(out_dir="out/s2"), dict(out_dir="out/s3", init_from="")]
    runs = [merged({**train.settings, "init_from": "out/pretrained"}, stage, "test") for stage in stages]
    train.chain_stages(runs, stages)
    assert [cfg["init_from"] for cfg in runs] == ["out/pretrained", "out/s0", "out/s1", ""]


def test_a_stage_may_not_undo_the_command_line():
    """The demo's stages set max_steps each: --max_steps=5 would be silently undone, so it is an error."""
    stages = [dict(out_dir="out/s0", max_steps=30), dict(out_dir="out/s1", max_steps=30)]
    train.check_stages_keep_command_line(stages, command_line_keys(["config/demo.py", "--device=cpu"]))
    with pytest.raises(ValueError, match=r"--max_steps is set again by stages\[0\] \(max_steps=30\)"):
        train.check_stages_keep_command_line(stages, command_line_keys(["config/demo.py", "--max_steps=5"]))


def test_a_text_length_multiple_below_one_is_refused_before_training():
    with pytest.raises(ValueError, match="pad_to_multiple=0: .* at least 1"):
        train.check_runs([merged(train.settings, {"pad_to_multiple": 0}, "test")])


def test_the_loss_curve_is_drawn_from_the_log_and_skipped_without_one(tmp_path):
    """A finished stage resumed after its metrics.jsonl was lost has nothing to draw, and is not an error."""
    train.plot_losses(str(tmp_path / "metrics.jsonl"), str(tmp_path / "loss.png"))
    assert not os.path.exists(tmp_path / "loss.png")
    train.append_jsonl(str(tmp_path / "metrics.jsonl"), {"step": 1, "loss": 2.5})
    train.plot_losses(str(tmp_path / "metrics.jsonl"), str(tmp_path / "loss.png"))
    assert os.path.exists(tmp_path / "loss.png")


def test_stages_that_share_an_out_dir_are_refused(tmp_path):
    """Each stage's log and checkpoints live in its out_dir (the next stage starts from it): two stages in one
    folder would overwrite each other."""
    with pytest.raises(subprocess.CalledProcessError) as error:
        run_train(tmp_path, stages=[dict(mask_kind="bidirectional", noise_prob=0.2), dict(mask_kind="prefix")])
    assert "the stages share an out_dir" in error.value.stderr


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file
    run_train(tmp_path, max_steps=2, checkpoint_interval=1)
    last = checkpoints.latest_checkpoint(str(tmp_path))
    weights = load_file(os.path.join(last, "model.safetensors"))
    weights["projector.fc2.bias"][0] = float("nan")  # a diverged run, in effect
    save_file(weights, os.path.join(last, "model.safetensors"))
    with pytest.raises(subprocess.CalledProcessError) as error:
        run_train(tmp_path, max_steps=4, checkpoint_interval=1, resume=True)
    assert "FloatingPointError" in error.value.stderr and "step 3: loss nan" in error.value.stderr
    assert checkpoints.latest_checkpoint(str(tmp_path)) == last
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("step-")) == ["step-0000001", "step-0000002"]


def test_packed_rows_train_like_padded_rows(tmp_path):
    """With pack_length, a batch's conversations share rows (data.pack_micro_batches: here micro-batches of one
    row of 256 tokens, so they divide the batch differently from the padded micro-batches of 4); each still
    sees only itself, and a batch's loss is the mean over its labels, so the losses are those of padded rows."""
    common = dict(shapes_questions=2, max_steps=3, vision_lr=1e-3, projector_lr=1e-3, language_lr=1e-3)
    cfg, tokenizer, model, _, _ = tiny_setup(pack_length=256, max_text_tokens=96, **common)  # demo.py's length
    micro_batches = next(iter(train.open_stream(cfg, tokenizer, model)))  # what the packed run trains on
    assert all("document" in batch for batch in micro_batches)
    assert sum(len(batch["input_ids"]) for batch in micro_batches) < cfg["global_batch"]  # rows shared
    padded = run_train(tmp_path / "padded", **common)
    packed = run_train(tmp_path / "packed", pack_length=256, **common)
    assert len(padded) == len(packed) == 3
    for a, b in zip(padded, packed):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a["loss"], b["loss"])

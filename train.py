"""Training: the paper's four stages (section 3.4, Table 5) in one readable loop.

    python train.py config/demo.py                               # the offline demo, ~6 minutes on a 2-core CPU
    torchrun --nproc_per_node=8 train.py config/stage2.py        # the paper's stage 2 on 8 GPUs
    python train.py config/stage1.py --micro_batch=16 --resume=True
    torchrun --nproc_per_node=8 train.py config/stage0.py config/qwen2.5-7b.py --out_dir=out/7b/stage0  # sharded

Every stage is the same loop: pick the trainable modules and their learning rates, the attention mask (stage 0:
bidirectional + input noise, Algorithm 1; stages 1-3: prefix, Algorithm 2), then minimise the next-token loss on
the text (eq. 1) for one epoch with AdamW and a cosine schedule, from the previous stage's checkpoint."""
import contextlib
import importlib
import json
import math
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import masks
import shapes
from checkpoints import checkpoint_folder, latest_checkpoint, restore_newest, save_checkpoint, write_atomically
from configurator import command_line_keys, configure, merged
from distributed import (catch_preemption, exit_preempted, is_sharded, log, rank, setup, shard, stop_requested,
                         sum_over_ranks, teardown, world_size)
from fast_path import compile_blocks, cuda_graphs_refused, own_gradients, use_fast_path, uses_cuda_graphs
from model import VLM, Qwen2Config, SigLIPConfig, VLMConfig

# -----------------------------------------------------------------------------
# Settings, by default the paper's stage 2: config/*.py and --key=value change `settings`; stages read it as `cfg`
# model
vision = "google/siglip-so400m-patch14-224"  # a Hub id or a local folder
language = "Qwen/Qwen2.5-0.5B"
init_from = ""                # our checkpoint to start from (the previous stage); empty: the pretrained backbones
projector_hidden = 896
vision_feature_layer = -2     # -2: LLaVA-OneVision's image features (layer 26 of 27, unnormed); -1: the last, normed
vision_config, language_config = {}, {}  # either set: random SigLIP and Qwen2 of these sizes (vocab: the tokenizer's)
tokenizer = ""                # without init_from: a folder or Hub id ("shapes": the demo's); empty: `language`'s
# data
dataset = "lmms-lab/LLaVA-ReCap-558K"
data_format = "parquet"       # parquet | llava_json | pathvqa | karpathy | synthetic
image_root = ""               # the image folder of llava_json / karpathy data (any size: resized on loading)
max_text_tokens = 256         # longer conversations are truncated (and counted)
pad_to_multiple = 64          # rows ([image | text]) are padded to a multiple of this: few shapes for compiled blocks
pack_length = 0               # > 0: pack each batch's conversations into rows of this many tokens (stage 3)
max_skip_fraction = 0.01      # more bad samples than this stops the run
max_text_only_fraction = 0.0  # more rows without an image than this stops the run (stage 3's data has some)
num_workers = 4
shuffle_chunks = 16           # row groups whose rows are shuffled together, so batches mix sources (data.BatchStream)
shapes_samples = 4000         # data_format synthetic: how many shape images (shapes.SyntheticShapes)
shapes_questions = 0          # ... and how many question turns follow each caption
shapes_captions = "consistent"  # ... in one wording; "human": many, synonyms, omissions (paper 4.6); "mixed": either
shapes_relations = False      # ... True: 1-3 shapes, questions on the whole image (counts, left of, same colour)
# the stage (paper 3.4): config/stage<N>.py sets these
mask_kind = "prefix"          # bidirectional (stage 0) | prefix (stages 1-3) | causal (LLaVA) | prefix_prompt
noise_prob = 0.0              # stage 0: share of text inputs replaced by noise (Algorithm 1)
noise_token_id = -1           # stage 0's noise: -1, uniformly random tokens (Algorithm 1); >= 0, this token id
vision_lr = 5e-6              # a learning rate of 0 freezes the module
projector_lr = 2e-3
language_lr = 2e-5
stages = []                   # several stages in one run: a list of dicts of the settings that differ (the demo)
# optimisation (paper 4.2; gradient accumulation and clipping: 3.5)
global_batch = 128
micro_batch = 16              # per GPU; accumulation makes up the global batch (packed: this many samples' tokens)
epochs = 1
max_steps = 0                 # 0: as many as the epochs need
warmup_steps = 20             # linear warm-up, over at most a tenth of the stage's steps
min_lr = 1e-8
weight_decay = 0.01
beta1, beta2 = 0.9, 0.999
grad_clip = 1.0               # the gradients' total norm is clipped to this; 0: no clipping
# system
out_dir = "out/stage2"        # the stage's checkpoints, metrics.jsonl and loss.png; it names the stage in the log
resume = False
checkpoint_interval = 500
preempt_signal = "SIGUSR1"    # as SIGTERM: the run saves the step it is in and exits 75 (Slurm: --signal=USR1@90)
seed = 1337
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype; master weights stay fp32
fast_path = torch.cuda.is_available()  # same loss and gradients by faster kernels; False: SDPA, dense mask, full logits
compile = torch.cuda.is_available()  # with fast_path: torch.compile each transformer block (fast_path.compile_blocks)
compile_mode = "reduce-overhead"  # blocks replayed as CUDA graphs; gradient checkpointing needs "default"
gradient_checkpointing = False
distributed = "ddp"           # ddp: a whole model per GPU; fsdp: weights, gradients, AdamW sharded over them (FSDP2)
peak_flops = 989e12           # the GPU's dense bf16 peak, the MFU's denominator here and in bench.py (H100/H200 SXM)
eval_after = False            # the demo: caption new images ("val" and "heldout") and score them at the end
tracker = ""                  # "trackio" or "wandb": also log metrics.jsonl's records there (rank 0); "": off
tracker_project = "vlm-align"
tracker_run = ""              # the run's name; empty: out_dir
settings = {k: v for k, v in globals().items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, list, dict))}
# -----------------------------------------------------------------------------


def main():
    configure(settings)
    catch_preemption(settings["preempt_signal"])
    check_stages_keep_command_line(settings["stages"], command_line_keys())
    runs = [merged(settings, overrides, f"stages[{i}]") for i, overrides in enumerate(settings["stages"])] or [settings]
    chain_stages(runs, settings["stages"])
    check_runs(runs)
    setup(settings["device"], group_of_one=any(cfg["distributed"] == "fsdp" for cfg in runs))
    for cfg in runs:
        final_checkpoint = train_stage(cfg)
    if settings["eval_after"] and rank() == 0:
        shapes.evaluate_demo(final_checkpoint, runs[-1])
    teardown()


def check_stages_keep_command_line(stages, given):
    """A stage's own settings win, so one that would undo a --key=value is an error, not a silent change."""
    for i, overrides in enumerate(stages):
        undone = sorted(given & set(overrides))
        if undone:
            raise ValueError(f"--{undone[0]} is set again by stages[{i}] ({undone[0]}={overrides[undone[0]]!r}), which "
                             "wins: change it in the config's stages, or train one stage (--stages=[])")


def chain_stages(runs, stages):
    """A stage without its own init_from starts from the previous one's out_dir (paper 3.4); the first, a global one."""
    for before, cfg, overrides in zip(runs, runs[1:], stages[1:]):
        if "init_from" not in overrides:
            cfg["init_from"] = before["out_dir"]


COUNTS = {"global_batch": "the samples of each optimizer step", "micro_batch": "the samples of each forward pass",
          "checkpoint_interval": "the steps from one checkpoint to the next",
          "pad_to_multiple": "text lengths are rounded up to a multiple of it (1: no rounding)"}


def check_runs(runs):
    """What would stop a run of several stages part way, found before the first one trains."""
    out_dirs = [cfg["out_dir"] for cfg in runs]
    if len(set(out_dirs)) < len(out_dirs):  # a later stage would overwrite an earlier one's log and checkpoints
        raise ValueError(f"the stages share an out_dir ({out_dirs}): give each stage its own")
    for cfg in runs:
        for key, meaning in COUNTS.items():
            if cfg[key] < 1:
                raise ValueError(f"{key}={cfg[key]}: {meaning}, so it must be at least 1")
        if cfg["tracker"] not in TRACKERS:
            raise ValueError(f"tracker={cfg['tracker']!r}: one of {TRACKERS} ('' is off)")
        if cfg["dtype"] not in ("bfloat16", "float32"):
            raise ValueError(f"dtype={cfg['dtype']!r}: train in 'bfloat16' (as the paper) or 'float32'; float16 "
                             "would need a loss scaler, which this loop does not have")
        if cfg["distributed"] not in ("ddp", "fsdp"):
            raise ValueError(f"distributed={cfg['distributed']!r}: 'ddp' (a whole model per GPU) or 'fsdp' (sharded)")


def train_stage(cfg):
    """Train one stage; returns the folder of its final checkpoint."""
    device, tokenizer, model, trainable, optimizer, stream = setup_stage(cfg)
    step, metrics_path = start_or_resume(cfg, model, optimizer, stream)
    total_steps = cfg["max_steps"] or cfg["epochs"] * len(stream)
    if total_steps <= 0:
        raise ValueError(f"nothing to train: max_steps={cfg['max_steps']} and epochs={cfg['epochs']}")
    plan = (f"packed into micro-batches of at most {stream.pack_rows} row(s) of {cfg['pack_length']} tokens"
            if cfg["pack_length"] else
            f"{stream.batch_size // cfg['micro_batch']} micro-batch(es) of {cfg['micro_batch']}")
    log(f"{cfg['out_dir']}: mask {cfg['mask_kind']}, noise {cfg['noise_prob']}, trainable {trainable}, "
        f"{total_steps} steps of {cfg['global_batch']} samples; on each of {world_size()} rank(s), {plan}")
    if cfg["fast_path"]:  # the reference path stays plain: no compiled blocks either
        use_fast_path(model)
        if cfg["compile"]:
            compile_blocks(model, cfg["compile_mode"])
    data_parallel = cfg["distributed"] == "ddp" and world_size() > 1  # FSDP: `model` itself is sharded (setup_stage)
    runner = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if data_parallel else model
    tracker = start_tracker(cfg)
    batches = endless(stream)
    progress = tqdm(total=total_steps, initial=step, disable=rank() != 0, dynamic_ncols=True)
    while step < total_steps:
        started = time.perf_counter()
        set_learning_rates(optimizer, step, total_steps, cfg)
        noise_generator = torch.Generator(device).manual_seed(cfg["seed"] + 1000 * step + rank())  # per rank, resumable
        loss, n_images, n_tokens, flops = train_step(runner, next(batches), cfg, device, trainable, noise_generator)
        grad_norm = clip_gradients(optimizer, cfg["grad_clip"]).item()
        loss = sum_over_ranks(loss.item(), device) / world_size()  # the batch's loss, over all ranks
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise FloatingPointError(f"{cfg['out_dir']} step {step + 1}: loss {loss}, gradient norm {grad_norm}; "
                                     f"stopping, with the checkpoints in {cfg['out_dir']} untouched")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - started
        # one all-reduce: the samples skipped etc., and whether any rank was signalled to stop (distributed.py)
        *totals, stop = sum_over_ranks([*stream.counts.values(), stop_requested()], device)
        counts = dict(zip(stream.counts, totals))
        record = {"step": step, "loss": loss, "grad_norm": grad_norm, **counts,
                  "lr": {group["name"]: group["lr"] for group in optimizer.param_groups},
                  "images_per_s": n_images * world_size() / elapsed, "tokens_per_s": n_tokens * world_size() / elapsed}
        if device.type == "cuda":
            record["mfu"] = flops * world_size() / elapsed / cfg["peak_flops"]
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if rank() == 0:
            append_jsonl(metrics_path, record)
            if tracker:
                tracker.log(tracker_record(record), step=step)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}", lr=f"{max(g['lr'] for g in optimizer.param_groups):.2e}",
                                 img_s=f"{record['images_per_s']:.1f}")
        if step % cfg["checkpoint_interval"] == 0 or step == total_steps or stop:
            saved = save_checkpoint(cfg, model, tokenizer, optimizer, step, stream.state_dict())
        if stop and step < total_steps:  # preempted: the step is done and saved
            if tracker:
                tracker.finish()
            exit_preempted(f"step {step} of {total_steps}, saved in {saved}")
    progress.close()
    if tracker:
        tracker.finish()
    if rank() == 0:
        plot_losses(metrics_path, os.path.join(cfg["out_dir"], "loss.png"))
    return latest_checkpoint(cfg["out_dir"])


def setup_stage(cfg):
    """Check the stage's settings, then build its model, trainable parts, optimizer and data stream."""
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if cfg["device"] == "cuda" else cfg["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 where bf16 autocast does not reach (paper 3.5)
        torch.backends.cudnn.allow_tf32 = True
    accumulation_steps(cfg["global_batch"], cfg["micro_batch"], world_size())  # the batch splits evenly
    masks.check_kind(cfg["mask_kind"])
    if uses_cuda_graphs(cfg) and (refused := cuda_graphs_refused(cfg)):
        raise ValueError(f"compile_mode={cfg['compile_mode']!r} with {refused}; set compile_mode='default'")
    tokenizer, model = build_model(cfg)
    # sample.py and eval.py decode under the training mask, but prefix for stage 0's: no token sees ones not yet made
    model.config.mask_kind = "prefix" if cfg["mask_kind"] == "bidirectional" else cfg["mask_kind"]
    model.to(device)
    trainable = freeze_modules(model, cfg)
    if cfg["distributed"] == "fsdp":  # before the optimizer, which takes the sharded parameters
        shard(model, cfg["dtype"])
    return device, tokenizer, model, trainable, make_optimizer(model, cfg), open_stream(cfg, tokenizer, model)


def start_or_resume(cfg, model, optimizer, stream):
    """(step, metrics path): with resume, from the newest intact checkpoint in out_dir, if any; else from step 0."""
    metrics_path = os.path.join(cfg["out_dir"], "metrics.jsonl")
    step = restore_newest(cfg["out_dir"], model, optimizer, stream, cfg) if cfg["resume"] else None  # None: none
    if step is not None:
        if rank() == 0 and os.path.exists(metrics_path):  # a lost log has no steps to drop
            keep_metrics_until(metrics_path, step)
        return step, metrics_path
    if cfg["resume"]:  # a job that is restarted until it is done resumes if it can
        log(f"resume: no checkpoint in {cfg['out_dir']} yet, so the stage starts from the beginning")
    if rank() == 0:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        open(metrics_path, "w").close()  # a fresh run starts a fresh log
    return 0, metrics_path


def accumulation_steps(global_batch, micro_batch, ranks):
    """Micro-steps per optimizer step, so that the global batch is the paper's 128 on any number of GPUs."""
    if global_batch % (micro_batch * ranks):
        raise ValueError(f"global_batch {global_batch} is not a multiple of micro_batch {micro_batch} x {ranks} ranks")
    return global_batch // (micro_batch * ranks)


def train_step(runner, micro_batches, cfg, device, trainable, noise_generator=None):
    """Forward and backward over a batch's micro-batches (DDP syncs on the last). Each mean loss counts by its share of
    the global batch's labels: the mean loss per token's gradient (eq. 1), however split. Returns this rank's part.
    Under FSDP every micro-batch's gradients are reduce-scattered (and summed into the shards): unsharded
    gradients kept over the micro-batches would cost the memory that sharding saves."""
    model = runner.module if isinstance(runner, DDP) else runner
    sizes = [batch_sizes(batch, model.n_image_tokens) for batch in micro_batches]
    n_labels = sum_over_ranks(sum(labelled for _, _, labelled in sizes), device)
    noise_token_id = cfg["noise_token_id"] if cfg["noise_token_id"] >= 0 else None  # None: random tokens
    autocast = torch.autocast(device.type, dtype=getattr(torch, cfg["dtype"]), enabled=cfg["dtype"] != "float32")
    total_loss = torch.zeros((), device=device)
    n_images = n_tokens = flops = 0
    for i, (batch, (images, text_tokens, labelled)) in enumerate(zip(micro_batches, sizes)):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not isinstance(runner, DDP) else runner.no_sync()
        torch.compiler.cudagraph_mark_step_begin()  # reduce-overhead: the last step's graph outputs are free
        with sync:
            with autocast:
                loss = runner(**batch, mask_kind=cfg["mask_kind"], noise_prob=cfg["noise_prob"],
                              noise_token_id=noise_token_id, generator=noise_generator)
            share = labelled * world_size() / n_labels  # DDP averages the ranks' gradients: undo its division
            (loss * share).backward()
        if i == 0 and not last and uses_cuda_graphs(cfg):
            own_gradients(model)
        total_loss += loss.detach() * share
        n_images += images
        n_tokens += images * model.n_image_tokens + text_tokens
        flops += images * model.training_flops(text_tokens / images, labelled / images, trainable)
    return total_loss, n_images, n_tokens, flops


def batch_sizes(batch, n_image_tokens):
    """(images, text tokens, labelled tokens) counted on the host (no GPU sync); padding too, unless rows are packed."""
    images, rows = len(batch["pixel_values"]), batch["document"]
    tokens = (rows >= 0).sum().item() if images > len(rows) else rows.numel()
    return images, tokens - images * n_image_tokens, len(batch["label_positions"])


def build_model(cfg):
    """The tokenizer and the VLM: our previous checkpoint, or the pretrained backbones (or random ones)."""
    if cfg["init_from"]:
        folder = checkpoint_folder(cfg["init_from"])  # a checkpoint, or the previous stage's out_dir: its newest one
        model = VLM.load(folder)
        if model.config.vision_feature_layer != cfg["vision_feature_layer"]:
            raise ValueError(f"vision_feature_layer={cfg['vision_feature_layer']}, but {folder} was trained on the "
                             f"features of layer {model.config.vision_feature_layer}: a later stage takes the same")
        return data.Tokenizer.from_pretrained(folder), model  # a checkpoint holds its tokenizer
    random_towers = cfg["vision_config"] or cfg["language_config"]
    tokenizer = (shapes.shapes_tokenizer() if random_towers and cfg["tokenizer"] == "shapes"
                 else data.Tokenizer.from_pretrained(cfg["tokenizer"] or cfg["language"]))
    torch.manual_seed(cfg["seed"])  # the random towers' initialisation, or the new projector's
    if not random_towers:
        return tokenizer, VLM.from_pretrained(cfg["vision"], cfg["language"], cfg["projector_hidden"],
                                              cfg["vision_feature_layer"])
    qwen2 = Qwen2Config(**{"vocab_size": tokenizer.vocab_size, **cfg["language_config"]})
    if qwen2.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"language_config vocab_size {qwen2.vocab_size} < the tokenizer's {tokenizer.vocab_size}")
    siglip = SigLIPConfig(**cfg["vision_config"])
    model = VLM(VLMConfig(siglip, qwen2, cfg["projector_hidden"], cfg["vision_feature_layer"]))
    return tokenizer, initialise(model)


def initialise(model, std=0.02):
    """Random weights the way SigLIP and Qwen2 start pre-training: small normal weights, zero biases, unit norms."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv2d)):
            torch.nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)
    return model


def freeze_modules(model, cfg):
    """A module whose learning rate is 0 is frozen (paper 3.4: stages 0-1 train the projector only): no gradients, no
    optimizer, eval mode."""
    trainable = [name for name in model.parameter_groups() if cfg[f"{name}_lr"] > 0]
    if not trainable:
        raise ValueError("every learning rate is 0: nothing to train")
    for name, module in model.parameter_groups().items():
        module.requires_grad_(name in trainable)
        module.train(name in trainable)
        module.gradient_checkpointing = cfg["gradient_checkpointing"]  # frozen too: the projector's gradient crosses it
    for p in model.unused_parameters():  # past the vision feature layer: no gradient ever reaches them
        p.requires_grad_(False)
    return trainable


def make_optimizer(model, cfg):
    """Fused AdamW, one learning rate per module; no weight decay on biases and norms (1-d tensors)."""
    groups = []
    for name, module in model.parameter_groups().items():
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            continue
        decay, no_decay = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
        groups += [{"name": name, "params": decay, "weight_decay": cfg["weight_decay"], "base_lr": cfg[f"{name}_lr"]},
                   {"name": name, "params": no_decay, "weight_decay": 0.0, "base_lr": cfg[f"{name}_lr"]}]
    return torch.optim.AdamW(groups, lr=0.0, betas=(cfg["beta1"], cfg["beta2"]), fused=True)


def clip_gradients(optimizer, max_norm):
    """Clip the total gradient norm to max_norm (paper 3.5; 0 or less: none, as nanoGPT); returns it before clipping."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if max_norm <= 0:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if is_sharded(norm) else norm  # FSDP: the norm over every rank's shards


def set_learning_rates(optimizer, step, total_steps, cfg):
    """Each group's rate from its base_lr: linear warm-up (ours: README), then cosine decay to `min_lr` (paper 4.2)."""
    warmup, min_lr = min(cfg["warmup_steps"], total_steps // 10), cfg["min_lr"]
    progress = (step - warmup) / max(1, total_steps - warmup)
    decay = 0.5 * (1 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        base_lr = group["base_lr"]
        group["lr"] = base_lr * (step + 1) / warmup if step < warmup else min_lr + (base_lr - min_lr) * decay


def open_stream(cfg, tokenizer, model):
    """This rank's share of each global batch, in micro-batches, from the `data_format` source (data.py, section 4)."""
    fmt, where, image_size = cfg["data_format"], cfg["dataset"], model.config.vision.image_size
    if fmt == "parquet":
        source = data.LlavaParquet(where)
    elif fmt == "pathvqa":
        source = data.PathVQAParquet(where, pattern="train-*.parquet")
    elif fmt == "llava_json":
        source = data.LlavaJson(where, cfg["image_root"])
    elif fmt == "karpathy":
        source = data.KarpathyCaptions(where, cfg["image_root"], split="train")
    elif fmt == "synthetic":
        source = shapes.SyntheticShapes(cfg["shapes_samples"], split="train", image_size=image_size, seed=cfg["seed"],
                                        questions=cfg["shapes_questions"], captions=cfg["shapes_captions"],
                                        relations=cfg["shapes_relations"])
    else:
        raise ValueError(f"unknown data_format {fmt!r}: parquet, pathvqa, llava_json, karpathy or synthetic")
    return data.BatchStream(
        source, tokenizer, cfg["global_batch"] // world_size(), model.n_image_tokens, cfg["micro_batch"],
        image_size=image_size, max_text_tokens=cfg["max_text_tokens"], seed=cfg["seed"], rank=rank(),
        world_size=world_size(), num_workers=cfg["num_workers"], max_skip_fraction=cfg["max_skip_fraction"],
        max_text_only_fraction=cfg["max_text_only_fraction"],
        pad_to_multiple=cfg["pad_to_multiple"], pack_length=cfg["pack_length"], shuffle_chunks=cfg["shuffle_chunks"])


def endless(stream):
    """Batches (each a list of micro-batches), epoch after epoch (the stream knows where it is, for checkpoints)."""
    while True:
        yield from stream


def keep_metrics_until(path, step):
    """Drop the log of the steps after `step`, the checkpoint resumed from: they are trained and logged again."""
    kept = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by the crash
                if json.loads(line)["step"] <= step:
                    kept.append(line)
    write_atomically(path, "".join(kept))


TRACKERS = ("", "trackio", "wandb")


def start_tracker(cfg):
    """nanoGPT's wandb_log through a library users already run: trackio (local-first, wandb's API) or wandb, a run
    named after out_dir holding the stage's settings. Rank 0 only; off (None) unless `tracker` names one, and only
    then imported. Returns the library: its log() and finish() take the place of the run's."""
    if not cfg["tracker"] or rank() != 0:
        return None
    library = importlib.import_module(cfg["tracker"])
    library.init(project=cfg["tracker_project"], name=cfg["tracker_run"] or cfg["out_dir"], config=cfg)
    return library


def tracker_record(record):
    """A metrics.jsonl record as the tracker takes it: flat ("lr/vision"), the step given apart."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update({f"{key}/{name}": item for name, item in value.items()})
        elif key != "step":
            flat[key] = value
    return flat


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_losses(metrics_path, png_path):
    """The loss curve as a PNG, drawn with pillow so training needs no plotting library."""
    from PIL import Image, ImageDraw
    losses = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            losses = [json.loads(line)["loss"] for line in f]
    if not losses:  # a finished stage resumed after its log was lost: nothing to draw
        return
    width, height, margin = 640, 360, 40
    canvas = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(canvas)
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0
    points = [(margin + i * (width - 2 * margin) / max(1, len(losses) - 1),
               height - margin - (loss - low) / span * (height - 2 * margin)) for i, loss in enumerate(losses)]
    pen.rectangle((margin, margin, width - margin, height - margin), outline="gray")
    if len(points) > 1:
        pen.line(points, fill=(30, 90, 200), width=2)
    pen.text((margin, 10), f"training loss: {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps", fill="black")
    pen.text((4, margin), f"{high:.2f}", fill="black")
    pen.text((4, height - margin - 10), f"{low:.2f}", fill="black")
    canvas.save(png_path)


if __name__ == "__main__":
    main()

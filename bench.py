"""How fast we train and caption, at the paper's full sizes with random weights (nothing is downloaded), in the
spirit of nanoGPT's bench.py. One JSON line per case as it finishes, then a table.

    python bench.py                                     # the speed issue's cases and stage 0, on one GPU (~6 minutes)
    python bench.py --stage 2 --micro_batch 32          # one training case
    python bench.py --no-fast_path --no-compile         # every case on our plain reference path
    python bench.py --compile_mode default              # every case compiled, without CUDA graphs
    python bench.py --generate                          # greedy captioning of 256 images
    python bench.py --device cpu --small                # a tiny model on the CPU: does the script work?

A training step is train.py's: the model's forward returns the loss, bf16 autocast over fp32 master weights,
backward, gradient clipping, fused AdamW with one learning rate per module; the stage's mask, input noise and
learning rates come from config/stage<N>.py, and a module whose learning rate is 0 is frozen (stages 0-1:
only the projector trains). The batches are synthetic, every text token labelled, as in the anchor
(../shared/bench/anchor_transformers.py: the transformers stack, same shapes); run both on the same GPU to
compare.
On the GPU the default is train.py's: the fast path (fast_path.py: the prefix mask of padded rows by blocks on
flash-attention kernels, FlexAttention for the other masks and packed rows, the chunked loss) with compiled
blocks in the stage's compile_mode; --no-fast_path --no-compile gives the plain reference path (SDPA with the
dense mask, F.cross_entropy over the full logits).
"""
import argparse
import gc
import json
import os
import random
import time

import torch

import data
import fast_path
import train
from configurator import configure, merged
from model import IGNORE_INDEX, VLM, Qwen2Config, SigLIPConfig, VLMConfig, find_label_positions
from sample import at_least

# The speed issue's cases, most important first (a time limit cuts the last). `anchor`: the transformers
# stack's images/s on one H200, same shapes; `target`: the issue's goal on that card.
ISSUE_CASES = [
    dict(stage=2, micro_batch=16, text_len=144, anchor=80, target=200),
    dict(stage=2, micro_batch=16, text_len=144, fast_path=False, compile=False, anchor=80),  # the plain reference
    dict(generate=True, micro_batch=256, text_len=20, new_tokens=30),  # target: 5000 images in < 60 s
    dict(stage=1, micro_batch=32, text_len=144, anchor=204, target=400),
    dict(stage=0, micro_batch=32, text_len=144),  # stage 1's shape, bidirectional: FlexAttention, not flash calls
    dict(stage=3, micro_batch=8, text_len=768, anchor=41, target=100),  # every row padded to 768 text tokens
    dict(stage=2, micro_batch=32, text_len=144, anchor=129),
    dict(stage=3, micro_batch=8, text_len=768, packed=True),  # 128 conversations, micro-batches of 4 rows of 2048
    dict(stage=2, micro_batch=16, text_len=144, compile_mode="default", anchor=80),  # compiled, without CUDA graphs
]
SMALL = dict(vision=SigLIPConfig(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4),
             language=Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, choices=[0, 1, 2, 3],
                        help="one training case (default: all the issue's cases, or stage 2 when a shape option is given)")
    parser.add_argument("--micro_batch", type=at_least(1), help="default: 16, or 256 images with --generate")
    parser.add_argument("--text_len", type=at_least(1),
                        help="text tokens after the image tokens (default: 144, or a prompt of 20 with --generate)")
    parser.add_argument("--labelled", type=at_least(1), help="labelled text tokens per sample, the last ones (default: "
                                                             "all, as the anchor; a stage-2 caption: about 52 of 128)")
    parser.add_argument("--packed", action="store_true", help="variable-length conversations packed into the rows")
    parser.add_argument("--generate", action="store_true", help="time greedy captioning instead of training")
    parser.add_argument("--new_tokens", type=at_least(1), default=30)
    parser.add_argument("--fast_path", action=argparse.BooleanOptionalAction, help="default: on the GPU only")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="default: on the GPU only")
    parser.add_argument("--compile_mode", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                        help="torch.compile's mode for the blocks (default: the stage's, as train.py reads it, "
                             "or 'default' with --grad_ckpt); reduce-overhead replays them as CUDA graphs")
    parser.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing in every tower that "
                        "gradients pass through (train.freeze_modules)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="a tiny model, micro-batches and texts an eighth of the "
                        "cases' (the names say what ran), for the CPU")
    parser.add_argument("--profile", action="store_true", help="after timing, print where 3 training steps spend their time")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps; the median is reported")
    return parser.parse_args()


def main():
    args = parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 where bf16 autocast does not reach, as train.py
    torch.backends.cudnn.allow_tf32 = True
    config = VLMConfig(**SMALL) if args.small else VLMConfig(SigLIPConfig(), Qwen2Config())
    # the measured peak is for information; MFU divides by the stated one, train.py's peak_flops
    print(json.dumps({"device": device_name(device), "torch": torch.__version__, "peak_tflops": round(peak_tflops(device), 3),
                      "peak": "measured bf16 matmul" if device.type == "cuda" else "measured fp32 matmul",
                      "mfu_peak_tflops": train.settings["peak_flops"] / 1e12}), flush=True)
    results = []
    for case in cases(args):
        result = run_case(config, case, device)
        if "error" in result and case["fast_path"] and not case["generate"]:  # still measure something: the
            result = run_case(config, dict(case, fast_path=False, compile_mode="default"), device)  # reference
        results.append(result)
    print_table(results)


def run_case(config, case, device):
    try:
        result = bench_generation(config, case, device) if case["generate"] else bench_training(config, case, device)
    except Exception as error:  # one failing case (e.g. out of memory) must not cost the others
        result = {"case": case_name(case), "error": repr(error)[:500]}
    print(json.dumps(result), flush=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def cases(args):
    """The cases to run, each a dict with every setting filled in."""
    fast = args.device.startswith("cuda")  # FlexAttention trains only on the GPU, and compiles fast only there
    defaults = dict(fast_path=fast, compile=fast, compile_mode=args.compile_mode,
                    grad_ckpt=args.grad_ckpt, packed=False,
                    warmup=args.warmup, steps=args.steps, generate=False, new_tokens=args.new_tokens,
                    profile=args.profile)
    for option in ("fast_path", "compile"):
        if getattr(args, option) is not None:
            defaults[option] = getattr(args, option)
    shape_given = any(getattr(args, option) is not None for option in ("micro_batch", "text_len", "labelled"))
    one_case = args.stage is not None or args.generate or args.packed or shape_given
    if not one_case:
        chosen = [dict(defaults, **case) for case in ISSUE_CASES]
    else:
        chosen = [dict(defaults, stage=2 if args.stage is None else args.stage, packed=args.packed, generate=args.generate,
                       micro_batch=args.micro_batch or (256 if args.generate else 16), labelled=args.labelled,
                       text_len=args.text_len or (20 if args.generate else 144))]
    for case in chosen:
        if not case["generate"] and case["compile_mode"] is None:
            refused = train.cuda_graphs_refused({"gradient_checkpointing": case["grad_ckpt"]}) or not case["fast_path"]
            case["compile_mode"] = "default" if refused else stage_settings(case["stage"], case["grad_ckpt"])["compile_mode"]
    if args.small:  # a batch the CPU finishes in seconds; the same cases otherwise
        for case in chosen:
            case.update(micro_batch=max(2, case["micro_batch"] // 8), text_len=max(8, case["text_len"] // 8),
                        new_tokens=min(case["new_tokens"], 8), anchor=None, target=None)
    return chosen


def case_name(case):
    if case["generate"]:
        return f"generate_b{case['micro_batch']}_{case['new_tokens']}tok"
    packed = "_packed" if case["packed"] else ""
    labelled = f"_labelled{case['labelled']}" if case.get("labelled") else ""
    return (f"stage{case['stage']}_b{case['micro_batch']}_text{case['text_len']}{labelled}{packed}_{'fast' if case['fast_path'] else 'reference'}"
            f"{compile_name(case)}{'_ckpt' if case['grad_ckpt'] else ''}")


def compile_name(case):
    if not case["compile"]:
        return ""
    return "_compile" if case["compile_mode"] == "default" else f"_compile_{case['compile_mode']}"


# -----------------------------------------------------------------------------
# Training

def bench_training(config, case, device):
    torch.manual_seed(0)
    stage = stage_settings(case["stage"], case["grad_ckpt"])
    with device:
        model = train.initialise(VLM(config))
    trainable = train.freeze_modules(model, stage)  # the same trainable parts and optimizer as train.py
    optimizer = train.make_optimizer(model, stage)
    train.set_learning_rates(optimizer, stage["warmup_steps"], 10 * stage["warmup_steps"], stage)
    if case["fast_path"]:
        fast_path.use_fast_path(model)
    if case["compile"]:
        fast_path.compile_blocks(model, case["compile_mode"])
    if case["packed"]:
        batch, n_images, n_tokens, padding = packed_batch(config, case, device, stage["pad_to_multiple"])
    else:
        batch, n_images, n_tokens, padding = padded_batch(config, case, device)
    n_labels = len(batch["label_positions"])
    losses = []

    def step():
        torch.compiler.cudagraph_mark_step_begin()  # as train.py: CUDA graphs may reuse the last step's outputs
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch, mask_kind=stage["mask_kind"], noise_prob=stage["noise_prob"])
        loss.backward()
        train.clip_gradients(optimizer, stage["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    seconds, _ = timed(step, case["warmup"], case["steps"], device)
    if case["profile"]:
        print_profile(step, device)
    text_tokens = case["text_len"]
    if case["packed"]:  # the documents' own tokens, as if each had a row of its own
        text_tokens = (n_tokens - n_images * model.n_image_tokens) / n_images
    flops = n_images * model.training_flops(text_tokens, n_labels / n_images, trainable)
    seq = batch["input_ids"].shape[1] if case["packed"] else model.n_image_tokens + case["text_len"]
    result = {"case": case_name(case), "stage": case["stage"], "micro_batch": case["micro_batch"], "seq": seq,
              "trainable": trainable, "step_s": round(seconds, 4),
              "images_per_s": round(n_images / seconds, 1), "tokens_per_s": round(n_tokens / seconds),
              "model_tflops": float(f"{flops / seconds / 1e12:.4g}"),  # MFU as train.py logs it: on the GPU only
              "mfu": round(flops / seconds / stage["peak_flops"], 3) if device.type == "cuda" else None,
              "peak_mem_gb": peak_memory_gb(device), "first_loss": round(losses[0].item(), 4),
              "loss": round(losses[-1].item(), 4)}  # same seed, same first batch: paths must agree on first_loss
    if case["packed"]:
        result.update(images=n_images, **padding)
    for key in ("anchor", "target"):
        if case.get(key):
            result[f"{key}_images_per_s"] = case[key]
    return result


def stage_settings(stage, grad_ckpt):
    """train.py's settings for the stage, as `python train.py config/stage<N>.py` would read them."""
    config_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", f"stage{stage}.py")
    return merged(configure(dict(train.settings), [config_file]), {"gradient_checkpointing": grad_ckpt}, "bench")


def padded_batch(config, case, device):
    """Every sample [256 image | text_len text] tokens, every text token labelled (as in the anchor), or only the
    last `labelled` (the answer after an unlabelled prompt)."""
    B, T = case["micro_batch"], case["text_len"]
    n_image_tokens = (config.vision.image_size // config.vision.patch_size) ** 2
    input_ids = torch.randint(0, config.language.vocab_size, (B, n_image_tokens + T))  # one document per row
    labels = input_ids.clone()
    labels[:, :n_image_tokens + T - min(case.get("labelled") or T, T)] = IGNORE_INDEX
    batch = {"pixel_values": torch.randn(B, 3, config.vision.image_size, config.vision.image_size),
             "input_ids": input_ids, "labels": labels, "document": torch.zeros_like(input_ids),
             "label_positions": find_label_positions(labels)}
    return {k: v.to(device) for k, v in batch.items()}, B, B * (n_image_tokens + T), {}


def conversation_lengths(n, longest, seed=0):
    """Text lengths of multi-turn conversations, a stand-in for LLaVA-NeXT's: log-normal around a third of
    `longest`, cut at `longest`."""
    rng = random.Random(seed)
    return [max(8, min(longest, round(rng.lognormvariate(0, 0.7) * longest / 3))) for _ in range(n)]


def packed_batch(config, case, device, pad_to_multiple, batch_size=128, n_batches=20):
    """Conversations of up to text_len text tokens, packed as train.py packs them (data.pack_micro_batches): the
    batch_size conversations of an optimizer step on one GPU share rows of twice the longest sample, cut into
    micro-batches of at most the tokens of micro_batch padded samples, each as long as its fullest row
    (rounded up to the stage's pad_to_multiple). The padding is averaged over all the micro-batches of
    `n_batches` batches, on one GPU and on eight (16 conversations per rank and step), and compared with
    padding micro_batch conversations to the longest; of the last batch, a full micro-batch holding the
    median number of conversations is the one timed."""
    n_image_tokens = (config.vision.image_size // config.vision.patch_size) ** 2
    row_len = 2 * (n_image_tokens + case["text_len"])
    rows = max(1, case["micro_batch"] * (n_image_tokens + case["text_len"]) // row_len)
    lengths = conversation_lengths(batch_size * n_batches, case["text_len"])
    image = torch.randn(3, config.vision.image_size, config.vision.image_size)  # one for all: only time matters

    def pack(texts):
        samples = [{"pixel_values": image, "input_ids": t, "labels": t} for t in texts]
        return data.pack_micro_batches(samples, row_len, n_image_tokens, rows, pad_to_multiple=pad_to_multiple)

    def padding(per_step):
        micro_batches = [b for i in range(0, len(lengths), per_step)
                         for b in pack([torch.zeros(n, dtype=torch.long) for n in lengths[i:i + per_step]])]
        return round(sum(int((b["document"] < 0).sum()) for b in micro_batches)
                     / sum(b["document"].numel() for b in micro_batches), 3)

    texts = [torch.randint(0, config.language.vocab_size, (n,)) for n in lengths[-batch_size:]]
    full = sorted((b for b in pack(texts) if b["document"].shape == (rows, row_len)), key=lambda b: len(b["pixel_values"]))
    batch = full[len(full) // 2]  # the longest conversations come first: time a typical micro-batch, not the first
    n_images, n_tokens = len(batch["pixel_values"]), int((batch["document"] >= 0).sum())
    groups = [lengths[i:i + case["micro_batch"]] for i in range(0, len(lengths), case["micro_batch"])]
    padded = sum(len(group) * (n_image_tokens + max(group)) for group in groups)
    padding = {"rows": rows, "row_len": row_len, "padding_packed": padding(batch_size),
               "padding_packed_8_gpus": padding(batch_size // 8),
               "padding_if_padded_to_longest": round(1 - sum(n_image_tokens + n for n in lengths) / padded, 3)}
    return {k: v.to(device) for k, v in batch.items()}, n_images, n_tokens, padding


# -----------------------------------------------------------------------------
# Greedy captioning

def bench_generation(config, case, device):
    """Greedy decoding of `new_tokens` tokens for micro_batch images; it never stops early (no end token
    exists), the worst case. Extrapolated to the 5000 images of the COCO Karpathy test split."""
    torch.manual_seed(0)
    with device:
        model = train.initialise(VLM(config)).eval()
    B, T = case["micro_batch"], case["text_len"]
    pixel_values = torch.randn(B, 3, config.vision.image_size, config.vision.image_size, device=device)
    prompt = torch.randint(0, config.language.vocab_size, (B, T), device=device)
    text_mask = torch.ones(B, T, dtype=torch.bool, device=device)

    def caption():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model.generate(pixel_values, prompt, text_mask, max_new_tokens=case["new_tokens"], eos_ids=(-1,))

    seconds, tokens = timed(caption, 1, 3, device)
    assert all(len(t) == case["new_tokens"] for t in tokens)
    return {"case": case_name(case), "micro_batch": B, "prompt_tokens": T, "new_tokens": case["new_tokens"],
            "batch_s": round(seconds, 3), "images_per_s": round(B / seconds, 1),
            "tokens_per_s": round(B * case["new_tokens"] / seconds), "seconds_for_5000_images": round(5000 * seconds / B, 1),
            "peak_mem_gb": peak_memory_gb(device)}


# -----------------------------------------------------------------------------
# Measuring

def timed(function, warmup, steps, device):
    """Median wall time of `steps` calls after `warmup` untimed ones, the device synchronised around each."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        synchronize(device)
        started = time.perf_counter()
        out = function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    timed_steps = sorted(times[warmup:])
    return timed_steps[len(timed_steps) // 2], out


def print_profile(function, device, calls=3):
    """The operations and kernels that took the most time over `calls` calls, from torch.profiler; on the GPU
    also where each step's wall time went (gpu_time_summary)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        for _ in range(calls):
            function()
        synchronize(device)
    wall_ms = (time.perf_counter() - started) / calls * 1e3
    events = profiler.key_averages()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort_by, row_limit=40, max_name_column_width=80), flush=True)
    if device.type == "cuda":
        print(json.dumps(gpu_time_summary(events, calls, wall_ms)), flush=True)


def gpu_time_summary(events, calls, wall_ms):
    """Milliseconds per step of GPU kernels by kind, and the rest of the wall time, when the GPU had nothing to
    run (waiting for the host to launch kernels). Only kernel events count: an operator's device time is its
    kernels' time again. The profiler slows the host, so `idle_ms` is an upper bound."""
    from torch.autograd import DeviceType
    busy = {}
    for event in events:
        if event.device_type == DeviceType.CUDA and not event.is_user_annotation:
            kind = kernel_kind(event.key)
            busy[kind] = busy.get(kind, 0.0) + event.self_device_time_total / calls / 1e3
    total = sum(busy.values())
    return {"wall_ms": round(wall_ms, 1), "gpu_busy_ms": round(total, 1), "idle_ms": round(wall_ms - total, 1),
            "busy_ms_by_kind": {kind: round(ms, 1) for kind, ms in sorted(busy.items(), key=lambda kv: -kv[1])}}


KERNEL_KINDS = [  # fragments of CUDA kernel names, first match wins
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
    ("attention", ("flash", "fmha", "attention", "flex", "triton_tem")),  # triton_tem: FlexAttention's templates
    ("optimizer", ("adam",)),
    ("communication", ("nccl",)),
    ("compiled (fused by inductor)", ("triton",)),
]


def kernel_kind(name):
    lowered = name.lower()
    return next((kind for kind, fragments in KERNEL_KINDS if any(f in lowered for f in fragments)), "other (eager ops)")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device):
    """The matmul rate this device reaches, as the anchor measures it: bf16 on the GPU, fp32 on the CPU. Printed
    for information; MFU divides by train.py's stated peak_flops."""
    n, dtype, repeats = (8192, torch.bfloat16, 20) if device.type == "cuda" else (1024, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - started) / 1e12


def peak_memory_gb(device):
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 1) if device.type == "cuda" else None


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def print_table(results):
    columns = ["case", "images_per_s", "anchor_images_per_s", "target_images_per_s", "tokens_per_s", "mfu",
               "peak_mem_gb", "step_s", "loss"]
    print()
    print(" | ".join(f"{c:>12}" if i else f"{c:<44}" for i, c in enumerate(columns)))
    for result in results:
        cells = [result.get(c, result.get("error", "")[:60] if c == "images_per_s" else "") for c in columns]
        if "batch_s" in result:
            cells[columns.index("step_s")] = result["batch_s"]
        print(" | ".join(f"{str(c):>12}" if i else f"{str(c):<44}" for i, c in enumerate(cells)))


if __name__ == "__main__":
    main()

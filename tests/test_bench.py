"""bench.py runs on the CPU at a tiny config (`--small`): every case of the speed issue, one JSON line each.
The figures mean nothing here; what is checked is that each case trains (a finite loss, the same first loss
on every path), that the FLOP count gives an MFU between 0 and 1, and that packing wastes less than padding;
and how `--profile` splits a GPU step's time."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_case_runs_on_the_cpu():
    run = subprocess.run([sys.executable, "bench.py", "--device", "cpu", "--small", "--warmup", "1", "--steps", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    header, results = lines[0], lines[1:]
    assert header["device"] == "cpu" and header["peak_tflops"] > 0  # measured, for information
    import train
    assert header["mfu_peak_tflops"] == train.settings["peak_flops"] / 1e12  # MFU's peak: the one train.py states
    assert [r for r in results if "error" in r] == []
    import bench
    assert len(results) == len(bench.ISSUE_CASES)
    training = [r for r in results if "loss" in r]
    for result in training:
        # no MFU off the GPU, as in train.py's log; the FLOP count stays below the CPU's measured matmul rate
        assert math.isfinite(result["loss"]) and result["mfu"] is None and 0 < result["model_tflops"] < header["peak_tflops"], result
        assert result["images_per_s"] > 0 and result["tokens_per_s"] > result["images_per_s"]
    # the same seed gives every case of a shape the same first batch and weights, so the same first loss; on the
    # CPU the three stage-2 cases of micro-batch 2 run one path (SDPA, eager), so compiled blocks with gradient
    # checkpointing are run beside them
    stage2_b2 = {r["first_loss"] for r in training if r["stage"] == 2 and r["micro_batch"] == 2}
    assert len(stage2_b2) == 1
    other_path = subprocess.run([sys.executable, "bench.py", "--device", "cpu", "--small", "--stage", "2", "--micro_batch",
                                 "16", "--compile", "--grad_ckpt", "--compile_mode", "default", "--warmup", "1", "--steps",
                                 "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert other_path.returncode == 0, other_path.stderr[-2000:]
    compiled = json.loads(next(line for line in other_path.stdout.splitlines() if line.startswith('{"case"')))
    assert compiled["case"].endswith("compile_ckpt") and math.isclose(compiled["first_loss"], stage2_b2.pop(), rel_tol=1e-5)
    packed = next(r for r in training if r["case"].endswith("packed_reference"))
    assert packed["padding_packed"] < packed["padding_if_padded_to_longest"]
    generation = next(r for r in results if r["case"].startswith("generate"))
    assert generation["seconds_for_5000_images"] > 0 and generation["new_tokens"] == 8


def test_gpu_time_summary_counts_each_kernel_once():
    """`--profile` on a GPU splits a step's wall time into kernel time by kind and idle time. An operator such as
    aten::mm carries its kernels' device time too: counting it as well would double the busy time and hide
    the idle time, so only kernel events count."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    import bench

    def event(name, device_type, microseconds):
        return SimpleNamespace(key=name, device_type=device_type, is_user_annotation=False,
                               self_device_time_total=microseconds)

    events = [event("aten::mm", DeviceType.CPU, 60_000),  # the operator: its kernel's 60 ms again
              event("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT", DeviceType.CUDA, 60_000),
              event("pytorch_flash::flash_fwd_kernel", DeviceType.CUDA, 15_000),
              event("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", DeviceType.CUDA, 30_000),
              event("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", DeviceType.CUDA, 9_000),
              event("void at::native::vectorized_elementwise_kernel<4>", DeviceType.CUDA, 6_000)]
    summary = bench.gpu_time_summary(events, calls=3, wall_ms=60.0)
    assert summary["gpu_busy_ms"] == 40.0 and summary["idle_ms"] == 20.0  # 120 ms of kernels over 3 steps
    assert summary["busy_ms_by_kind"] == {"matmul": 20.0, "compiled (fused by inductor)": 10.0, "attention": 5.0,
                                          "optimizer": 3.0, "other (eager ops)": 2.0}


def test_each_case_compiles_in_the_mode_train_py_uses_for_its_stage(monkeypatch):
    """Unless a case or `--compile_mode` says otherwise, a case compiles its blocks in the mode train.py reads
    for its stage (config/stage<N>.py over train.py's default); one stage-2 case goes without CUDA graphs."""
    import bench
    import train
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cuda"])  # the GPU's defaults; nothing runs here
    modes = [(case["stage"], case["packed"], case["compile_mode"]) for case in bench.cases(bench.parse_args())
             if not case["generate"] and case["compile"]]
    assert train.settings["compile_mode"] == "reduce-overhead"  # CUDA graphs by default
    assert modes[0] == (2, False, "reduce-overhead")  # the headline case
    assert (1, False, "reduce-overhead") in modes
    assert (0, False, "reduce-overhead") in modes  # its mask per batch lies in model.FixedInputs
    assert (3, True, "reduce-overhead") in modes  # config/stage3.py's packed rows, their masks in model.FixedInputs
    assert (3, False, "reduce-overhead") in modes  # the stage-3 shape padded, as config/pathvqa.py trains
    assert (2, False, "default") in modes  # the headline case without CUDA graphs
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cuda", "--stage", "2", "--grad_ckpt"])
    assert [case["compile_mode"] for case in bench.cases(bench.parse_args())] == ["default"]  # as train.py requires
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cuda", "--stage", "3", "--compile_mode", "reduce-overhead"])
    assert [case["compile_mode"] for case in bench.cases(bench.parse_args())] == ["reduce-overhead"]


def test_a_shape_option_asks_for_one_case(monkeypatch, tmp_path):
    """--micro_batch and the other shape options make one case (stage 2 unless --stage says otherwise) rather
    than being dropped for the issue's cases; the stage's config file is found from any directory."""
    import bench
    monkeypatch.chdir(tmp_path)
    for options, stage, micro_batch in [(["--micro_batch", "32"], 2, 32), (["--packed", "--stage", "3"], 3, 16),
                                        (["--text_len", "768"], 2, 16)]:
        monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "cuda", *options])
        [case] = bench.cases(bench.parse_args())
        assert (case["stage"], case["micro_batch"]) == (stage, micro_batch), options
    monkeypatch.setattr(sys, "argv", ["bench.py", "--labelled", "0"])
    with pytest.raises(SystemExit):  # not silently dropped: a count below 1 is refused
        bench.parse_args()


def bench_case(*options):
    run = subprocess.run([sys.executable, "bench.py", "--device", "cpu", "--small", "--stage", "2", "--warmup", "1",
                          "--steps", "2", *options], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(next(line for line in run.stdout.splitlines() if line.startswith('{"case"')))


def test_fsdp_case_trains_as_the_plain_model():
    """`--distributed fsdp`: the model sharded as train.py shards it, in a process group of one; same seed, same
    batch, so the same losses as the plain model after 3 optimizer steps."""
    plain, sharded = bench_case(), bench_case("--distributed", "fsdp")
    assert sharded["case"] == plain["case"] + "_fsdp"
    assert math.isclose(sharded["first_loss"], plain["first_loss"], rel_tol=1e-5)
    assert math.isclose(sharded["loss"], plain["loss"], rel_tol=1e-5)


def test_memory_per_gpu_is_computed_from_the_parameter_counts():
    """The language models' counts are Qwen2.5's published ones (model cards: 0.49B, 1.54B, 3.09B, 7.61B); DDP
    keeps 16 bytes per trainable parameter on every GPU (the issue: ~120 GB for 7B + SigLIP), FSDP a share of them
    plus the units it gathers in bf16; a frozen parameter costs 4 bytes."""
    import bench
    from model import SigLIPConfig, VLMConfig
    published = {"0.5B": 0.49e9, "1.5B": 1.54e9, "3B": 3.09e9, "7B": 7.61e9}
    configs = {name: VLMConfig(SigLIPConfig(), language, projector_hidden=language.hidden_size)
               for name, language in bench.QWEN25.items()}
    for name, config in configs.items():
        counts, _, _ = bench.parameter_counts(config)
        assert abs(counts["language"] - published[name]) < 0.01e9, (name, counts["language"])
    seven = configs["7B"]
    counts, largest_block, all_blocks = bench.parameter_counts(seven)
    total = sum(counts.values())
    assert bench.model_state_gb(seven, "ddp", 8) == pytest.approx(16 * total / 2**30) == pytest.approx(120, abs=1)
    assert bench.model_state_gb(seven, "ddp", 8, trainable=("projector",)) == pytest.approx(
        (4 * total + 12 * counts["projector"]) / 2**30)
    gathered_gb = 4 * (total - all_blocks + 2 * largest_block) / 2**30  # bf16 weights and gradients
    for gpus in (1, 2, 8):
        assert bench.model_state_gb(seven, "fsdp", gpus) == pytest.approx(16 * total / gpus / 2**30 + gathered_gb)
    assert bench.model_state_gb(seven, "fsdp", 8) < 80 < bench.model_state_gb(seven, "ddp", 8)  # fits an 80 GB card

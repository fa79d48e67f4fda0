"""bench.py runs on the CPU at a tiny config (`--small`): every case of the speed issue, one JSON line each.
The figures mean nothing here; what is checked is that each case trains (a finite loss, the same first loss
on every path), that the FLOP count gives an MFU between 0 and 1, and that packing wastes less than padding."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_case_runs_on_the_cpu():
    run = subprocess.run([sys.executable, "bench.py", "--device", "cpu", "--small", "--warmup", "1", "--steps", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    header, results = lines[0], lines[1:]
    assert header["device"] == "cpu" and header["peak_tflops"] > 0
    assert [r for r in results if "error" in r] == []
    import bench
    assert len(results) == len(bench.ISSUE_CASES)
    training = [r for r in results if "loss" in r]
    for result in training:
        assert math.isfinite(result["loss"]) and 0 < result["mfu"] < 1, result
        assert result["images_per_s"] > 0 and result["tokens_per_s"] > result["images_per_s"]
    # the same seed gives every path the same first batch and weights: the same first loss, whatever the options
    stage2_b2 = {r["first_loss"] for r in training if r["stage"] == 2 and r["micro_batch"] == 2}
    assert len(stage2_b2) == 1
    packed = next(r for r in training if r["case"].endswith("packed_sdpa"))
    assert packed["padding_packed"] < packed["padding_if_padded_to_longest"]
    generation = next(r for r in results if r["case"].startswith("generate"))
    assert generation["seconds_for_5000_images"] > 0 and generation["new_tokens"] == 8

"""experiments.py: each experiment's arms differ from the paper's recipe in the one thing compared, at equal steps;
the runner trains a small arm pair end to end and writes its table, picture and numbers."""
import json

import pytest
from PIL import Image

import experiments


def settings_of(stages):
    return {name: settings for name, settings in stages}


def test_arms_change_one_thing_at_equal_total_steps():
    steps = experiments.STEPS
    chosen = experiments.experiments(steps)
    assert list(chosen) == ["masks", "stage0", "align_first", "captions"]
    paper = experiments.recipe(steps)
    assert [name for name, _ in paper] == ["stage0", "stage1", "stage2"]
    stage0, stage1, stage2 = (settings for _, settings in paper)
    assert (stage0["mask_kind"], stage0["noise_prob"], stage1["mask_kind"], stage2["mask_kind"]) == \
        ("bidirectional", 0.2, "prefix", "prefix")
    assert stage0["language_lr"] == stage1["language_lr"] == 0 < stage2["language_lr"]  # align first (paper 3.4)
    for name, (claim, arms) in chosen.items():
        assert claim and len(arms) >= 2 and next(iter(arms.values())) == paper  # the paper's arm first
        for arm, stages in arms.items():
            assert sum(s["max_steps"] for _, s in stages) == sum(s["max_steps"] for _, s in paper), (name, arm)
            assert settings_of(stages)["stage2"]["shapes_questions"] == 2
    masks = chosen["masks"][1]
    assert [settings_of(stages)["stage2"]["mask_kind"] for stages in masks.values()] == ["prefix", "causal", "prefix_prompt"]
    assert all(settings_of(stages)["stage0"]["mask_kind"] == "bidirectional" for stages in masks.values())
    noise = {arm: settings_of(stages).get("stage0") for arm, stages in chosen["stage0"][1].items()}
    assert noise["no stage 0"] is None
    assert [noise[arm]["noise_prob"] for arm in ("noise 0", "noise 0.1", "noise 0.2 (paper)", "noise 0.4")] == [0, 0.1, 0.2, 0.4]
    assert noise["noise 0.2, one fixed token"]["noise_token_id"] == experiments.FIXED_NOISE_TOKEN
    unfrozen = settings_of(chosen["align_first"][1]["unfrozen from the start"])
    assert list(unfrozen) == ["stage1", "stage2"] and unfrozen["stage1"]["language_lr"] > 0
    human = chosen["captions"][1]["human"]
    assert all(settings["shapes_captions"] == "human" for _, settings in human)


def test_steps_to_a_loss_level_counts_from_the_start_on_the_last_stage():
    run = {"losses": [[0.1] * 5, [3.0] * 20 + [0.5] * 30]}  # stage 0's low loss does not count
    assert experiments.steps_to(run, 1.0) == 5 + 20 + 9  # the 10-step running mean is below 1.0 from the 9th low step
    assert experiments.steps_to(run, 0.1) is None
    assert experiments.final_loss(run) == 0.5
    assert experiments.mean_std([1.0, 3.0]) == "2.0 ± 1.4" and experiments.mean_std([None]) == "-"


def test_an_arm_pair_end_to_end(tmp_path, monkeypatch, capsys):
    """align_first's two arms, one seed, a few steps of tiny models: the table names both arms, the picture is drawn."""
    monkeypatch.setattr(experiments, "SMALL", {
        **experiments.SMALL, "shapes_samples": 64, "global_batch": 4, "micro_batch": 4, "warmup_steps": 1,
        "vision_config": dict(image_size=32, patch_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2),
        "language_config": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, rope_theta=10000.0, tie_word_embeddings=True),
        "projector_hidden": 16})
    monkeypatch.setattr(experiments, "QUICK_STEPS", dict(language=2, vision=2, align=2, train=4))
    out = tmp_path / "experiments"
    experiments.main(["align_first", "--quick", "--seeds=1", "--jobs=1", f"--out={out}"])
    table = (out / "align_first" / "results.md").read_text()
    for arm in ("align first (paper)", "unfrozen from the start"):
        assert f"| {arm} |" in table
    unfrozen = next(line for line in table.splitlines() if line.startswith("| unfrozen"))
    assert unfrozen.split(" | ")[4] == "-"  # no stage 0 to report a loss after
    assert table.count(" --- |") == 8 and all(  # every row has the header's 8 columns
        line.count(" | ") == 7 for line in table.splitlines() if line.startswith("| ") and "---" not in line)
    assert "steps to loss <" in table and "most common training answer" in table
    with Image.open(out / "align_first" / "loss.png") as picture:
        assert picture.size == (900, 520)
    results = json.loads((out / "align_first" / "results.json").read_text())
    assert results["seeds"] == [1337]
    for arm in results["arms"].values():
        [run] = arm["runs"]
        assert [len(losses) for losses in run["losses"]] in ([2, 2, 4], [4, 4])
        assert 0 <= run["captions"] and 0 <= run["questions"] <= 100
    capsys.readouterr()
    experiments.main(["align_first", "--quick", "--seeds=1", "--jobs=1", f"--out={out}", "--resume"])
    assert "(0 trainings now)" in capsys.readouterr().out  # an interrupted run keeps what it finished


def test_unknown_experiments_and_empty_counts_are_refused(capsys):
    for argv in (["nosuch"], ["--seeds=0"], ["--jobs=0"]):
        with pytest.raises(SystemExit):
            experiments.main(argv)
        assert "error:" in capsys.readouterr().err

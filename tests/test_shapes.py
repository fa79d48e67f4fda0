"""The demo's synthetic world: scenes drawn as captioned, the heldout split, its tokenizer and its evaluation."""
import math

import numpy as np
import pytest

from data import Tokenizer
from shapes import (SHAPE_COLOURS, SHAPE_POSITIONS, SyntheticShapes, cider_d, describe_scene, evaluate_demo, is_heldout,
                    scene_questions, shapes_tokenizer)


@pytest.fixture(scope="module")
def tokenizer():
    """The demo's tiny tokenizer: byte-level, so it encodes any text, and fast to build."""
    return shapes_tokenizer()


def test_synthetic_shapes_are_deterministic_from_the_seed():
    a, b = SyntheticShapes(10, seed=3, questions=2), SyntheticShapes(10, seed=3, questions=2)
    for i in range(10):
        assert a.record(i)["conversations"] == b.record(i)["conversations"]
        assert np.array_equal(np.asarray(a.record(i)["image"]), np.asarray(b.record(i)["image"]))
    other_seed = SyntheticShapes(10, seed=4, questions=2)
    assert [a.record(i)["scene"] for i in range(10)] != [other_seed.record(i)["scene"] for i in range(10)]
    assert len(a.record(0)["conversations"]) == 6  # the caption turn, then two questions


def test_captions_say_what_is_drawn_where():
    shapes = SyntheticShapes(50, image_size=64)
    for i in range(50):
        sample = shapes.record(i)
        pixels = np.asarray(sample["image"])
        drawn = {position for _, _, position in sample["scene"]}
        for colour, kind, position in sample["scene"]:
            assert f"a {colour} {kind} in the {position}" in sample["conversations"][1]["value"]
            x, y = (int(c * 64) for c in SHAPE_POSITIONS[position])
            assert tuple(pixels[y, x]) == SHAPE_COLOURS[colour], (i, colour, kind, position)
            # the kind, by how much of its bounding box the shape fills: a square all, a circle pi/4, a triangle half
            corner = pixels[y - 16:y + 16, x - 16:x + 16]
            filled = (corner == SHAPE_COLOURS[colour]).all(-1)
            rows, cols = filled.any(1).nonzero()[0], filled.any(0).nonzero()[0]
            fill = filled.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))
            expected_fill = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}[kind]
            assert abs(fill - expected_fill) < 0.1, (i, kind, fill)
        for position in set(SHAPE_POSITIONS) - drawn:
            x, y = (int(c * 64) for c in SHAPE_POSITIONS[position])
            assert tuple(pixels[y, x]) == (255, 255, 255)


def test_heldout_captions_are_new_strings_made_of_seen_parts():
    train = [SyntheticShapes(2000).record(i)["scene"] for i in range(2000)]
    heldout = [SyntheticShapes(100, split="heldout").record(i)["scene"] for i in range(100)]
    seen_captions = {describe_scene(scene) for scene in train}
    assert not seen_captions & {describe_scene(scene) for scene in heldout}  # never a training string...
    seen_shapes = {shape for scene in train for shape in scene}
    assert all(shape in seen_shapes for scene in heldout for shape in scene)  # ...yet each part was seen
    assert len({describe_scene(scene) for scene in heldout}) > 50
    val = [SyntheticShapes(100, split="val").record(i)["scene"] for i in range(100)]
    assert not any(is_heldout(scene) for scene in val)
    assert val != [SyntheticShapes(100).record(i)["scene"] for i in range(100)]  # new samples, not the training ones


def test_demo_tokenizer_knows_the_chat_tokens_and_the_shape_words(tokenizer, tmp_path):
    caption = "a yellow triangle in the bottom right."
    assert len(tokenizer.encode(caption)) == 8  # a word a token: the BPE learnt the demo's words
    assert tokenizer.encode("<|im_start|>assistant\n")[0] == tokenizer.im_start_id
    assert len({tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.eos_id}) == 3
    text = "Unseen words, ünïcödé and 😀 still round-trip."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    tokenizer.save(tmp_path)
    assert Tokenizer.from_pretrained(str(tmp_path)).encode(caption) == tokenizer.encode(caption)


def test_questions_are_answered_by_the_scene():
    scene = [("red", "circle", "top left"), ("blue", "circle", "bottom right")]
    questions = dict(scene_questions(scene))
    assert questions["How many shapes are there?"] == "two."
    assert questions["What is in the bottom right?"] == "a blue circle."
    assert questions["Where is the red circle?"] == "in the top left."
    assert "What colour is the circle?" not in questions  # two circles: the question would be ambiguous


def test_cider_d_rewards_the_right_captions():
    truths = [describe_scene(SyntheticShapes(3).record(i)["scene"]) for i in range(3)]
    assert cider_d(truths, truths) == pytest.approx(10.0)  # CIDEr-D's similarities times 10
    assert cider_d(truths[::-1], truths) < cider_d(truths, truths)


def test_evaluate_demo_captions_and_questions_new_images(tmp_path, capsys):
    from test_train import tiny_setup
    cfg, tokenizer, model, _, _ = tiny_setup(shapes_questions=1)
    model.save(tmp_path / "checkpoint", tokenizer=tokenizer)
    evaluate_demo(str(tmp_path / "checkpoint"), cfg, n_images=2)
    printed = capsys.readouterr().out
    for line in ("val captions: CIDEr-D ", "heldout captions: CIDEr-D ", "heldout questions: "):
        assert line in printed

"""The demo's synthetic world: scenes drawn as captioned, the heldout split, its tokenizer and its evaluation; the
variants experiments.py uses: relation questions on scenes of 1-3 shapes, human-style captions."""
import hashlib
import math
import random

import numpy as np
import pytest

from data import Tokenizer
from shapes import (HUMAN_KIND_WORDS, HUMAN_PLACE_WORDS, SHAPE_COLOURS, SHAPE_POSITIONS, SHAPES_CAPTION_PROMPT,
                    SyntheticShapes, cider_d, describe_scene, evaluate_demo, human_caption, is_heldout, relation_questions,
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


# --- the variants: relation questions, human-style captions -------------------------------------------------

def test_the_demo_world_is_unchanged_by_the_variants():
    """Default settings draw the very samples they drew before the variants existed (the demo's numbers rely on it)."""
    record = SyntheticShapes(3, seed=0, questions=2, image_size=48).record(0)
    assert record["conversations"] == [
        {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "one."},
        {"from": "human", "value": "What colour is the triangle?"}, {"from": "gpt", "value": "blue."},
        {"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": "a blue triangle in the top left."}]
    assert hashlib.sha256(np.asarray(record["image"]).tobytes()).hexdigest()[:16] == "8c97ee9102b2f2eb"
    assert SyntheticShapes(2, split="heldout", seed=5).record(1)["scene"] == [
        ("green", "square", "bottom left"), ("green", "circle", "bottom right")]
    explicit = SyntheticShapes(3, seed=0, questions=2, image_size=48, captions="consistent", relations=False)
    assert explicit.record(0)["conversations"] == record["conversations"]


def corners_drawn(image):
    """{position: colour name} of the corners whose centre is coloured in the image."""
    pixels, size = np.asarray(image), image.size[0]
    drawn = {}
    for position, (cx, cy) in SHAPE_POSITIONS.items():
        colour = tuple(pixels[int(cy * size), int(cx * size)])
        if colour != (255, 255, 255):
            drawn[position] = next(name for name, rgb in SHAPE_COLOURS.items() if rgb == colour)
    return drawn


def test_relation_answers_follow_the_image():
    shapes = SyntheticShapes(60, image_size=64, questions=30, relations=True)
    counts = set()
    for i in range(60):
        record = shapes.record(i)
        drawn, scene = corners_drawn(record["image"]), record["scene"]
        assert drawn == {position: colour for colour, _, position in scene}
        answers = dict(relation_questions(scene))
        numbers = ["none.", "one.", "two.", "three."]
        assert answers["How many shapes are there?"] == numbers[len(drawn)]
        counts.add(len(drawn))
        for colour in SHAPE_COLOURS:
            assert answers[f"How many {colour} shapes are there?"] == numbers[list(drawn.values()).count(colour)]
        turns = record["conversations"]
        for question, reply in zip(turns[::2], turns[1::2]):  # every question asked is answered as the scene says
            if question["value"] != "Describe the image.":
                assert answers[question["value"]] == reply["value"]
    assert counts == {1, 2, 3}


def test_relations_of_a_scene():
    scene = [("red", "circle", "top left"), ("red", "square", "bottom right"), ("blue", "circle", "top right")]
    answers = dict(relation_questions(scene))
    assert answers["How many shapes are there?"] == "three."
    assert answers["How many red shapes are there?"] == "two."
    assert answers["How many green shapes are there?"] == "none."
    assert answers["How many circles are there?"] == "two."
    assert answers["Is the red circle left of the blue circle?"] == "yes."
    assert answers["Is the blue circle left of the red square?"] == "no."  # above it, not left of it
    assert answers["Is the red square left of the red circle?"] == "no."
    assert answers["Where is the red circle from the red square?"] == "above and to the left."
    assert answers["Where is the blue circle from the red square?"] == "above."
    assert answers["Where is the blue circle from the red circle?"] == "to the right."
    assert "Are the circle and the square the same colour?" not in answers  # two circles: "the circle" is ambiguous
    two = dict(relation_questions([("red", "circle", "top left"), ("red", "square", "top right")]))
    assert two["Are the circle and the square the same colour?"] == "yes."
    assert dict(relation_questions([("red", "circle", "top left"), ("blue", "square", "top right")]))[
        "Are the circle and the square the same colour?"] == "no."


def test_relation_scenes_keep_the_heldout_split():
    train = [SyntheticShapes(1500, relations=True).record(i)["scene"] for i in range(1500)]
    heldout = [SyntheticShapes(200, split="heldout", relations=True).record(i)["scene"] for i in range(200)]
    val = [SyntheticShapes(200, split="val", relations=True).record(i)["scene"] for i in range(200)]
    assert not any(is_heldout(scene) for scene in train + val) and all(is_heldout(scene) for scene in heldout)
    assert {len(scene) for scene in heldout} == {2, 3} and {len(scene) for scene in train} == {1, 2, 3}
    assert not {describe_scene(s) for s in train} & {describe_scene(s) for s in heldout}


def test_human_captions_say_only_what_is_drawn_in_many_wordings():
    kind_of = {word: kind for kind, words in HUMAN_KIND_WORDS.items() for word in words}
    places = sorted((p for ps in HUMAN_PLACE_WORDS.values() for p in ps), key=len, reverse=True)
    place_of = {word: position for position, words in HUMAN_PLACE_WORDS.items() for word in words}
    consistent = SyntheticShapes(200, questions=2, relations=True)
    human = SyntheticShapes(200, questions=2, relations=True, captions="human")
    for i in range(200):
        a, b = consistent.record(i), human.record(i)
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))  # the same images and questions
        pairs = lambda r: [(q["value"], t["value"]) for q, t in zip(r["conversations"][::2], r["conversations"][1::2])]
        assert [p for p in pairs(a) if p[0] != SHAPES_CAPTION_PROMPT] == [p for p in pairs(b) if p[0] != SHAPES_CAPTION_PROMPT]
        caption = dict(pairs(b))[SHAPES_CAPTION_PROMPT]
        assert caption.endswith(".")
        text = caption
        for place in places:  # every place it names holds a shape
            if place in text:
                assert place_of[place] in {position for _, _, position in b["scene"]}, caption
                text = text.replace(place, "")
        words = text.rstrip(".").split()
        assert {kind_of[w] for w in words if w in kind_of} <= {kind for _, kind, _ in b["scene"]}, caption
        assert {w for w in words if w in SHAPE_COLOURS} <= {colour for colour, _, _ in b["scene"]}, caption
        assert any(w in kind_of for w in words), caption  # at least one shape is mentioned
    scene = [("red", "circle", "top left"), ("blue", "square", "bottom right")]
    wordings = {human_caption(scene, random.Random(i)) for i in range(50)}
    assert len(wordings) > 30  # several wordings per scene, in either order
    assert any(w.index("red") > w.index("blue") for w in wordings if "red" in w and "blue" in w)
    assert any("red" not in w or "blue" not in w for w in wordings)  # something left out


def test_mixed_captions_draw_either_style():
    mixed = SyntheticShapes(40, captions="mixed")
    captions = [mixed.record(i)["conversations"][1]["value"] for i in range(40)]
    consistent = [describe_scene(mixed.record(i)["scene"]) for i in range(40)]
    same = sum(c == d for c, d in zip(captions, consistent))
    assert 5 < same < 35
    with pytest.raises(ValueError, match="captions must be one of"):
        SyntheticShapes(1, captions="poetic")


def test_the_experiments_tokenizer_knows_every_world():
    tokenizer = shapes_tokenizer(512, every_world=True)
    assert len(tokenizer.encode("Where is the red circle from the blue square?")) <= 10
    assert len(tokenizer.encode("a red ball in the upper left corner.")) <= 9


def test_cider_d_takes_several_references():
    truths = ["a red circle in the top left.", "a blue square in the bottom right."]
    several = [[truths[0], "a red ball top left."], [truths[1], "a blue box."]]
    assert cider_d(truths, several) > 0 and cider_d(truths, [[t] for t in truths]) == pytest.approx(cider_d(truths, truths))

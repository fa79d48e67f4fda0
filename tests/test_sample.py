"""sample.py on a tiny random checkpoint: one image streams its answer, several are answered in one batch
without mixing them up, beam search runs, and prompts are left-padded. Also home of the tiny checkpoint
that test_eval.py uses."""
import pytest
import torch
from PIL import Image

import sample
from conftest import save_qwen2, save_siglip
from data import SHORT_CAPTION_PROMPT, chat_prompt, train_tokenizer
from model import VLM

# What the tiny tokenizer learns from, and test_eval.py's reference captions: the random model's answers mix
# these words with stray bytes, so their caption scores are small but not all zero.
CAPTIONS = ["A cat sits on a red mat.", "Two dogs run across a green park.", "A man rides a brown horse on the beach.",
            "A plate of food with a fork and a knife.", "A group of people standing next to a bus.",
            "A little girl holding a kite in the sky.", "A train is going down the tracks.",
            "A bowl of fruit on a wooden table.", "A person riding a bike down the street."]


def tiny_tokenizer():
    """A byte-level BPE learnt from a few captions and the prompt (data.py's demo tokenizer recipe)."""
    prompt = chat_prompt([{"role": "user", "content": SHORT_CAPTION_PROMPT}])
    return train_tokenizer(CAPTIONS + [prompt], vocab_size=400)


def save_tiny_checkpoint(folder):
    """A random VLM (SigLIP 56x56 -> 16 image tokens, 2-layer Qwen2) saved with its tokenizer, as train.py would.
    The large initializer makes the greedy answers varied instead of one token repeated."""
    tokenizer = tiny_tokenizer()
    save_siglip(folder / "siglip")
    save_qwen2(folder / "qwen2", initializer_range=0.3, vocab_size=tokenizer.vocab_size)
    model = VLM.from_pretrained(vision=str(folder / "siglip"), language=str(folder / "qwen2"), projector_hidden=32)
    model.save(folder / "checkpoint", tokenizer=tokenizer)
    return folder / "checkpoint"


def save_image(path, seed):
    """A random-noise RGB image, so that every image gives the model different pixels."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (40 + seed, 60, 3), generator=generator, dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return [save_image(folder / f"image{i}.png", seed=i) for i in range(3)]


def run(checkpoint, *args):
    return sample.main(["--checkpoint", checkpoint, "--device", "cpu", "--max_new_tokens", "8", *args])


def test_one_image_streams_the_answer_as_it_is_generated(checkpoint, images, capsys):
    answers = run(checkpoint, "--image", images[0], "--prompt", "What is in the image?")
    assert len(answers) == 1 and answers[0]
    assert capsys.readouterr().out.strip() == answers[0]


def test_token_printer_prints_each_token_but_waits_for_whole_characters(capsys):
    tokenizer = tiny_tokenizer()
    ids = tokenizer.encode("a cat é")  # é is two byte-level tokens: the tiny BPE never saw it
    printer = sample.TokenPrinter(tokenizer)
    printed_after_each = []
    for token in ids:
        printer(torch.tensor([token]))
        printed_after_each.append(capsys.readouterr().out)
    assert "".join(printed_after_each) == "a cat é"
    assert all(printed_after_each[:-2]) and printed_after_each[-2:] == ["", "é"]


def test_several_images_are_answered_each_on_its_own(checkpoint, images, capsys):
    together = run(checkpoint, "--image", images[0], "--image", ",".join(images[1:]))
    printed = capsys.readouterr().out
    alone = [run(checkpoint, "--image", image)[0] for image in images]
    assert together == alone
    assert printed == "".join(f"{image}: {text}\n" for image, text in zip(images, together))
    assert len(set(together)) > 1  # different images get different answers from the random model


def test_beam_search_prints_at_the_end(checkpoint, images, capsys):
    answers = run(checkpoint, "--image", images[0], "--num_beams", "3")
    assert capsys.readouterr().out == f"{images[0]}: {answers[0]}\n"


def test_left_pad_lines_up_the_ends_of_the_prompts():
    input_ids, text_mask = sample.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert text_mask.tolist() == [[True, True, True], [False, False, True]]


def test_prompt_ends_where_the_assistant_answers():
    tokenizer = tiny_tokenizer()
    text = tokenizer.decode(sample.prompt_ids(tokenizer, "Describe it."), skip_special_tokens=False)
    assert text.endswith("<|im_start|>user\nDescribe it.<|im_end|>\n<|im_start|>assistant\n")

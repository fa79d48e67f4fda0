"""sample.py on a tiny random checkpoint: one image streams its answer, several are answered in one batch
without mixing them up, beam search runs, and prompts are left-padded."""
import pytest
import torch

import sample
from conftest import save_image, save_tiny_checkpoint, tiny_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return [save_image(folder / f"image{i}.png", seed=i) for i in range(3)]


def run(checkpoint, *args):
    return sample.main(["--checkpoint", checkpoint, "--device", "cpu", "--max_new_tokens", "8", *args])


def test_one_image_streams_the_answer_as_it_is_generated(checkpoint, images, capsys, monkeypatch):
    from model import VLM
    generate, on_screen_when_generated = VLM.generate, []

    def generate_then_look_at_the_screen(self, *args, **kwargs):
        tokens = generate(self, *args, **kwargs)
        on_screen_when_generated.append(capsys.readouterr().out)
        return tokens

    monkeypatch.setattr(VLM, "generate", generate_then_look_at_the_screen)
    answers = run(checkpoint, "--image", images[0], "--prompt", "What is in the image?")
    assert len(answers) == 1 and answers[0]
    # the answer was printed while it was generated, token by token; after, only the line's end, and the last
    # character if its bytes never completed (held back while more of them could come: a random model's answer)
    [printed_while_generating], printed_after = on_screen_when_generated, capsys.readouterr().out
    assert printed_while_generating + printed_after == answers[0] + "\n"
    assert printed_after in ("\n", "\ufffd\n")


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
    printer = sample.TokenPrinter(tokenizer)
    for token in tokenizer.encode(" \n a dog"):  # leading whitespace is left out, as answer() strips it
        printer(torch.tensor([token]))
    assert capsys.readouterr().out == "a dog"


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


def test_the_default_prompt_is_the_caption_instruction_of_the_coco_fine_tune():
    args = sample.parse_args(["--image", "a.png"])
    assert args.prompt == "Provide a one-sentence caption for the provided image."
    assert sample.parse_args(["--image", "a.png", "--prompt", "What is it?"]).prompt == "What is it?"


def test_left_pad_lines_up_the_ends_of_the_prompts():
    input_ids, text_mask = sample.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert text_mask.tolist() == [[True, True, True], [False, False, True]]


def test_prompt_ends_where_the_assistant_answers():
    tokenizer = tiny_tokenizer()
    text = tokenizer.decode(sample.prompt_ids(tokenizer, "Describe it."), skip_special_tokens=False)
    assert text.endswith("<|im_start|>user\nDescribe it.<|im_end|>\n<|im_start|>assistant\n")


def test_a_prompt_reads_as_the_same_question_did_in_training():
    """A question with LLaVA's <image> placeholder or stray spaces is cleaned as training cleaned it, so the
    prompt is, token for token, the start of the training sequence."""
    from data import encode_conversation
    tokenizer = tiny_tokenizer()
    for question in ("<image>\nWhat is present? ", "What is present?\n<image>", "what is present?"):
        trained, _ = encode_conversation(tokenizer, [{"from": "human", "value": question}, {"from": "gpt", "value": "a."}])
        prompt = sample.prompt_ids(tokenizer, question)
        assert trained[:len(prompt)] == prompt, question


def test_answers_are_decoded_under_the_mask_the_checkpoint_was_trained_under(checkpoint, images, tmp_path):
    """config.json keeps the mask a checkpoint was trained under (train.py writes it): one trained with LLaVA's
    causal mask is decoded under the causal mask, unless --mask_kind says otherwise."""
    from data import Tokenizer
    from model import VLM
    model = VLM.load(checkpoint)
    model.config.mask_kind = "causal"
    model.save(tmp_path / "causal", tokenizer=Tokenizer.from_pretrained(checkpoint))
    all_images = ",".join(images)
    causal = run(str(tmp_path / "causal"), "--image", all_images)
    assert VLM.load(str(tmp_path / "causal")).config.mask_kind == "causal"
    assert run(checkpoint, "--image", all_images, "--mask_kind", "causal") == causal
    assert run(str(tmp_path / "causal"), "--image", all_images, "--mask_kind", "prefix") == run(checkpoint, "--image", all_images)
    assert causal != run(checkpoint, "--image", all_images)  # the mask matters to this model

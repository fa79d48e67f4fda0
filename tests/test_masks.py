"""The paper's masks (section 3.2, Fig. 3) as exact matrices, and proof that the model honours them."""
import pytest
import torch

import masks
from model import VLM

T, F = True, False


def test_causal():
    assert masks.causal(3).tolist() == [[T, F, F], [T, T, F], [T, T, T]]


def test_prefix_image_block_is_bidirectional_and_blind_to_text():
    # 2 image tokens then 3 text tokens: Fig. 3(b)
    assert masks.prefix(5, 2).tolist() == [
        [T, T, F, F, F],   # image token 0 sees both image tokens, no text
        [T, T, F, F, F],
        [T, T, T, F, F],   # text sees every image token and earlier text
        [T, T, T, T, F],
        [T, T, T, T, T],
    ]


def test_bidirectional():
    # Fig. 3(a): every token, image or text, sees every other
    assert masks.bidirectional(3).tolist() == [[T, T, T]] * 3


def test_padding_keys_are_hidden_but_rows_never_empty():
    document = torch.tensor([[0, 0, 0, -1]])  # 2 image tokens, 1 text token, 1 pad
    got = masks.attention_mask("prefix", 2, document)
    assert got.shape == (1, 1, 4, 4)
    assert got[0, 0].tolist() == [
        [T, T, F, F],
        [T, T, F, F],
        [T, T, T, F],
        [F, F, F, T],   # the pad query sees only itself: no all-False row, no NaN
    ]
    left_padded = masks.attention_mask("causal", 0, torch.tensor([[-1, -1, 0]]))[0, 0]
    assert left_padded.tolist() == [[T, F, F], [F, T, F], [F, F, T]]


@pytest.mark.parametrize("mask_kind", masks.MASK_KINDS)
def test_packed_documents_each_get_their_own_mask_on_the_diagonal(mask_kind):
    """Two documents in a row (data.pack_documents) are masked as if each had a row of its own, the image
    slots being each document's first tokens; they never see each other, and a pad sees only itself."""
    document = torch.tensor([[0] * 7 + [1] * 5 + [-1] * 2])  # documents of 7 and 5 tokens, 2 pads
    expected = torch.eye(14, dtype=torch.bool)
    expected[:7, :7] = masks.attention_mask(mask_kind, 4, torch.zeros(1, 7, dtype=torch.long))[0, 0]
    expected[7:12, 7:12] = masks.attention_mask(mask_kind, 4, torch.zeros(1, 5, dtype=torch.long))[0, 0]
    assert torch.equal(masks.attention_mask(mask_kind, 4, document)[0, 0], expected)
    if mask_kind == "prefix":  # and the one-document rule is Fig. 3(b) itself
        assert torch.equal(expected[:7, :7], masks.prefix(7, 4))


def test_prefix_prompt_opens_the_block_over_image_and_prompt_and_keeps_answers_causal():
    """PaliGemma's prefix-LM: 2 image tokens, a prompt of 2 (no label), an answer of 2 (labelled). The prompt
    sees the whole image and prompt, the image sees the prompt too; the answer is causal. A second turn's
    question, after the first answer, is not in the block. Without labels (a prompt being answered) the
    whole prompt is the block."""
    document = torch.zeros(1, 6, dtype=torch.long)
    labelled = torch.tensor([[F, F, F, F, T, T]])
    assert masks.attention_mask("prefix_prompt", 2, document, labelled)[0, 0].tolist() == [
        [T, T, T, T, F, F],
        [T, T, T, T, F, F],
        [T, T, T, T, F, F],
        [T, T, T, T, F, F],
        [T, T, T, T, T, F],
        [T, T, T, T, T, T],
    ]
    assert torch.equal(masks.attention_mask("prefix_prompt", 2, document, labelled)[0, 0], masks.prefix_prompt(6, 4))
    second_turn = torch.tensor([[F, F, F, T, F, T]])  # answer at 3, a question at 4, an answer at 5
    assert masks.prefix_block("prefix_prompt", 2, document, second_turn).tolist() == [[T, T, T, F, F, F]]
    packed = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, -1]])
    labelled = torch.tensor([[F, F, F, T, F, F, T, T, F]])
    assert masks.prefix_block("prefix_prompt", 2, packed, labelled).tolist() == [[T, T, T, F, T, T, F, F, F]]
    assert masks.prefix_block("prefix_prompt", 2, packed).tolist() == [[T] * 8 + [F]]


def test_positions_restart_in_every_document():
    document = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1]])
    assert masks.document_positions(document).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert masks.image_slots(document, 2).tolist() == [[True, True, False, True, True, False, False, False]]


def test_noise_replaces_about_the_requested_share_of_text_inputs_only():
    ids = torch.full((64, 50), 7)
    eligible = torch.ones(64, 50, dtype=torch.bool)
    eligible[:, 40:] = False  # e.g. padding: never noised
    generator = torch.Generator().manual_seed(0)
    noisy = masks.add_noise(ids, eligible, prob=0.2, noise_token_id=3, generator=generator)
    replaced = noisy != ids
    assert not replaced[:, 40:].any()
    assert abs(replaced[:, :40].float().mean().item() - 0.2) < 0.02
    assert set(noisy[replaced].tolist()) == {3}
    random_noise = masks.add_noise(ids, eligible, prob=0.5, vocab_size=100, generator=generator)
    assert len(set(random_noise[random_noise != ids].tolist())) > 50


def test_stage_0_reads_noised_inputs_and_predicts_the_clean_text(tiny_backbones):
    """Algorithm 1 inside VLM.forward: with noise_prob, the loss is that of the same batch whose text inputs went
    through add_noise (the same generator seed), against the clean ids as labels; image slots and padding get
    no noise."""
    from model import IGNORE_INDEX
    model = VLM.from_pretrained(*map(str, tiny_backbones), projector_hidden=32).eval()
    n = model.n_image_tokens
    pixels, ids = torch.randn(2, 3, 56, 56), torch.randint(0, 300, (2, n + 12))
    document = torch.zeros_like(ids)
    document[1, n + 9:] = -1
    text = (document >= 0) & (torch.arange(n + 12) >= n)
    labels = ids.masked_fill(~text, IGNORE_INDEX)
    vocab_size = model.config.language.vocab_size
    with torch.no_grad():
        noised = model(pixels, ids, labels, document, mask_kind="bidirectional", noise_prob=0.2,
                       generator=torch.Generator().manual_seed(3))
        noised_ids = masks.add_noise(ids, text, 0.2, None, vocab_size, torch.Generator().manual_seed(3))
        assert (noised_ids != ids).any() and torch.equal(noised_ids[~text], ids[~text])
        expected = model(pixels, noised_ids, labels, document, mask_kind="bidirectional")
        clean = model(pixels, ids, labels, document, mask_kind="bidirectional")
        fixed = model(pixels, ids, labels, document, mask_kind="bidirectional", noise_prob=0.2, noise_token_id=5,
                      generator=torch.Generator().manual_seed(3))
        fixed_ids = masks.add_noise(ids, text, 0.2, 5, vocab_size, torch.Generator().manual_seed(3))
        assert torch.equal(fixed, model(pixels, fixed_ids, labels, document, mask_kind="bidirectional"))
    assert torch.equal(noised, expected) and not torch.allclose(noised, clean)


def test_drawing_shows_the_two_masks_of_figure_3_and_the_prefix_over_the_prompt(tmp_path):
    """`python masks.py`: (a) every cell green; (b) the image block green, the text causal, no image token
    seeing text; (c) the block of image and 2 prompt tokens green. Four image and four text tokens, cells of
    28 pixels, panels 40 pixels apart."""
    from PIL import Image
    image = Image.open(masks.draw(str(tmp_path / "masks.png"))).convert("RGB")
    green, red = (60, 170, 80), (210, 60, 60)

    def cell(panel, i, j):  # the colour at the middle of row i, column j
        return image.getpixel((40 + panel * (8 * 28 + 40) + j * 28 + 13, 40 + i * 28 + 13))
    assert all(cell(0, i, j) == green for i in range(8) for j in range(8))
    assert cell(1, 0, 3) == green and cell(1, 0, 4) == red   # image sees image, not text
    assert cell(1, 4, 0) == green and cell(1, 4, 5) == red   # text sees the image, not later text
    assert cell(1, 6, 5) == green
    assert cell(2, 0, 5) == green and cell(2, 4, 5) == green and cell(2, 5, 6) == red  # the prompt in the block
    assert cell(2, 6, 7) == red and cell(2, 7, 6) == green   # the answers causal


# --- the model honours the masks ---------------------------------------------------------------------

def hidden_states(model, image_tokens, ids, mask_kind):
    """The language model's outputs over [image tokens | ids], one document per row (VLM.hidden_states)."""
    n = model.n_image_tokens
    rows = torch.cat([torch.zeros(len(ids), n, dtype=torch.long), ids], dim=1)
    with torch.no_grad():
        return model.hidden_states(image_tokens, rows, torch.zeros_like(rows), mask_kind)


def image_and_text_outputs(model, pixels, ids, mask_kind):
    with torch.no_grad():
        hidden = hidden_states(model, model.image_tokens(pixels), ids, mask_kind)
    return hidden[:, :model.n_image_tokens], hidden[:, model.n_image_tokens:]


def test_under_prefix_image_outputs_ignore_the_text(tiny_backbones):
    model = VLM.from_pretrained(*map(str, tiny_backbones), projector_hidden=32).eval()
    pixels = torch.randn(1, 3, 56, 56)
    ids = torch.randint(0, 300, (1, 6))
    changed = ids.clone()
    changed[0, 3:] = (changed[0, 3:] + 1) % 300
    image_a, text_a = image_and_text_outputs(model, pixels, ids, "prefix")
    image_b, text_b = image_and_text_outputs(model, pixels, changed, "prefix")
    assert torch.equal(image_a, image_b)
    assert torch.equal(text_a[:, :3], text_b[:, :3])  # text before the change is unaffected too
    assert not torch.allclose(text_a[:, 3:], text_b[:, 3:])
    # the same change is visible to the image tokens under the bidirectional stage-0 mask
    image_c, _ = image_and_text_outputs(model, pixels, ids, "bidirectional")
    image_d, _ = image_and_text_outputs(model, pixels, changed, "bidirectional")
    assert not torch.allclose(image_c, image_d)


def test_under_prefix_image_tokens_see_later_image_tokens_but_not_under_causal(tiny_backbones):
    model = VLM.from_pretrained(*map(str, tiny_backbones), projector_hidden=32).eval()
    ids = torch.randint(0, 300, (1, 4))
    image_tokens = torch.randn(1, model.n_image_tokens, 64)
    later_changed = image_tokens.clone()
    later_changed[:, -1] += 1.0  # only the last image token changes

    def first_image_output(tokens, mask_kind):
        return hidden_states(model, tokens, ids, mask_kind)[:, 0]

    assert torch.equal(first_image_output(image_tokens, "causal"), first_image_output(later_changed, "causal"))
    assert not torch.allclose(first_image_output(image_tokens, "prefix"), first_image_output(later_changed, "prefix"))


def test_under_prefix_prompt_the_prompt_sees_later_prompt_tokens_but_not_the_answer(tiny_backbones):
    """The image and the prompt (before the first label) read each other both ways; the answer stays causal."""
    model = VLM.from_pretrained(*map(str, tiny_backbones), projector_hidden=32).eval()
    n = model.n_image_tokens
    ids = torch.randint(0, 300, (1, n + 6))
    labelled = torch.zeros_like(ids, dtype=torch.bool)
    labelled[:, n + 3:] = True  # a prompt of 3 tokens, an answer of 3
    image_tokens = model.image_tokens(torch.randn(1, 3, 56, 56))

    def outputs(ids, mask_kind):
        with torch.no_grad():
            return model.hidden_states(image_tokens, ids, torch.zeros_like(ids), mask_kind, labelled=labelled)
    last_prompt, first_answer = ids.clone(), ids.clone()
    last_prompt[0, n + 2] = (ids[0, n + 2] + 1) % 300
    first_answer[0, n + 3] = (ids[0, n + 3] + 1) % 300
    base = outputs(ids, "prefix_prompt")
    assert not torch.allclose(outputs(last_prompt, "prefix_prompt")[:, :n + 2], base[:, :n + 2])  # seen by all
    assert torch.equal(outputs(first_answer, "prefix_prompt")[:, :n + 3], base[:, :n + 3])  # seen by none before
    assert torch.equal(outputs(last_prompt, "prefix")[:, :n + 2], outputs(ids, "prefix")[:, :n + 2])  # Fig. 3(b)

"""Generation: the KV cache changes nothing, beam search finds likelier captions than greedy, padding on either
side gives the same captions, and our greedy decoding and beam search equal transformers' `generate` on the same
weights."""
import collections

import pytest
import torch
import torch.nn.functional as F

import data
from conftest import save_qwen2, save_siglip
from model import VLM

EOS = 299


@pytest.fixture(scope="module")
def model_and_reference(tmp_path_factory):
    """A tiny VLM whose Qwen2 has large random weights, so that greedy paths are varied, not one repeated token."""
    root = tmp_path_factory.mktemp("generate")
    save_siglip(root / "siglip")
    reference = save_qwen2(root / "qwen2", initializer_range=0.3)
    torch.manual_seed(0)  # the new projector's initialisation
    model = VLM.from_pretrained(str(root / "siglip"), str(root / "qwen2"), projector_hidden=32).eval()
    return model, reference


def prompts(batch=3, length=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 56, 56, generator=generator), torch.randint(0, 290, (batch, length), generator=generator)


def one_document_rows(model, pixels, ids, labels=None):
    """[image | ids] as training lays out a document per row (data.collate)."""
    labels = ids if labels is None else labels
    return data.collate([{"pixel_values": p, "input_ids": i, "labels": l} for p, i, l in zip(pixels, ids, labels)],
                        model.n_image_tokens, pad_id=0)


def greedy_without_cache(model, pixels, ids, steps, mask_kind="prefix"):
    """The definition: recompute the whole sequence for every new token and take the argmax; the new tokens
    are the answer (labelled: causal under prefix_prompt, the prompt before them both ways)."""
    prompt_length = model.n_image_tokens + ids.shape[1]
    with torch.no_grad():
        image_tokens = model.image_tokens(pixels)
        for _ in range(steps):
            rows = one_document_rows(model, pixels, ids)
            answer = torch.arange(rows["input_ids"].shape[1]) >= prompt_length
            hidden = model.hidden_states(image_tokens, rows["input_ids"], rows["document"], mask_kind,
                                         labelled=answer.expand_as(rows["document"]))
            next_token = model.language.lm_head(hidden[:, -1]).argmax(-1)
            ids = torch.cat([ids, next_token[:, None]], dim=1)
    return ids


@pytest.mark.parametrize("mask_kind", ["prefix", "prefix_prompt", "causal"])
def test_kv_cache_greedy_equals_recomputing_everything(model_and_reference, mask_kind):
    """The prefill runs the prompt under the mask (prefix_prompt: image and prompt both ways), then each new
    token sees everything before it."""
    model, _ = model_and_reference
    pixels, ids = prompts()
    expected = greedy_without_cache(model, pixels, ids, steps=8, mask_kind=mask_kind)[:, ids.shape[1]:]
    got = model.generate(pixels, ids, torch.ones_like(ids, dtype=torch.bool), max_new_tokens=8, mask_kind=mask_kind,
                         eos_ids=(-1,))  # no token ends: all 8 steps compared
    assert got == expected.tolist()
    assert len(set(sum(got, []))) > 3  # a varied path, so the comparison means something


def test_a_cache_is_used_only_with_positions_and_a_mask(model_and_reference):
    """After a prefill, new tokens sit at later positions and see the cached ones: the language model's defaults
    (positions from 0, a square causal mask) would be wrong, so with a cache it asks for both."""
    from decoding import KVCache
    language, (_, ids) = model_and_reference[0].language, prompts()
    cache = KVCache()
    language(ids[:, :-1], cache=cache, position_ids=torch.arange(4).expand(3, 4), mask=torch.ones(1, 1, 4, 4).tril().bool())
    with pytest.raises(ValueError, match="with a cache, give position_ids and mask"):
        language(ids[:, -1:], cache=cache)


def test_beam_search_with_a_beam_per_word_finds_the_most_likely_continuation(model_and_reference):
    """With as many beams as words and no end token, two steps of beam search keep every first token, so the
    search is exhaustive: it must return the most probable two-token continuation, found here by brute force
    over all 300 x 300 of them; greedy, which looks one token ahead, misses it here."""
    model, _ = model_and_reference
    pixels, ids = prompts(batch=1, seed=2)
    vocab = model.config.language.vocab_size
    [beams] = model.generate(pixels, ids, torch.ones_like(ids, dtype=torch.bool), max_new_tokens=2, num_beams=vocab,
                             eos_ids=(-1,))
    [greedy] = model.generate(pixels, ids, torch.ones_like(ids, dtype=torch.bool), max_new_tokens=2, eos_ids=(-1,))
    with torch.no_grad():  # every first token after the prompt, and the log-probabilities of every second one
        sequences = torch.cat([ids.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        rows = one_document_rows(model, pixels.expand(vocab, -1, -1, -1), sequences)
        hidden = model.hidden_states(model.image_tokens(pixels).expand(vocab, -1, -1), rows["input_ids"],
                                     rows["document"], "prefix")
        log_probs = torch.log_softmax(model.language.lm_head(hidden).float(), dim=-1)
        first = log_probs[0, -2]  # the prompt's last position: the same in every row
        total = first[:, None] + log_probs[:, -1]  # [first token, second token]
    best = divmod(total.argmax().item(), vocab)
    assert beams == list(best)
    assert total[tuple(greedy)] < total[best]  # here greedy's first choice leads to a less likely pair


def test_left_and_right_padding_give_the_unpadded_captions(model_and_reference):
    model, _ = model_and_reference
    pixels, ids = prompts(batch=2, length=6, seed=3)
    short = ids[1, :4]  # the second prompt is two tokens shorter
    alone = [model.generate(pixels[i:i + 1], prompt[None], torch.ones(1, len(prompt), dtype=torch.bool),
                            max_new_tokens=6, eos_ids=(EOS,))[0] for i, prompt in enumerate([ids[0], short])]
    right = ids.clone()
    right_mask = torch.ones_like(ids, dtype=torch.bool)
    right[1, 4:], right_mask[1, 4:] = 0, False
    left = ids.clone()
    left_mask = torch.ones_like(ids, dtype=torch.bool)
    left[1] = torch.cat([torch.zeros(2, dtype=torch.long), short])
    left_mask[1, :2] = False
    for padded, text_mask in [(right, right_mask), (left, left_mask)]:
        for num_beams in (1, 3):
            batched = model.generate(pixels, padded, text_mask, max_new_tokens=6, num_beams=num_beams, eos_ids=(EOS,))
            expected = alone if num_beams == 1 else [
                model.generate(pixels[i:i + 1], p[None], torch.ones(1, len(p), dtype=torch.bool), max_new_tokens=6,
                               num_beams=3, eos_ids=(EOS,))[0] for i, p in enumerate([ids[0], short])]
            assert batched == expected, (num_beams, text_mask.tolist())


def test_generation_stops_at_the_end_token(model_and_reference):
    model, _ = model_and_reference
    pixels, ids = prompts(batch=1, seed=4)
    text_mask = torch.ones_like(ids, dtype=torch.bool)
    free = model.generate(pixels, ids, text_mask, max_new_tokens=8, eos_ids=(EOS,))[0]
    stopped = model.generate(pixels, ids, text_mask, max_new_tokens=8, eos_ids=(free[2],))[0]
    assert stopped == free[:free.index(free[2])]


def test_streaming_callback_sees_each_token(model_and_reference):
    model, _ = model_and_reference
    pixels, ids = prompts(batch=1, seed=5)
    streamed = []
    got = model.generate(pixels, ids, torch.ones_like(ids, dtype=torch.bool), max_new_tokens=5, eos_ids=(EOS,),
                         on_token=lambda tokens: streamed.append(tokens.item()))
    assert streamed == got[0]


def test_greedy_equals_transformers_generate(model_and_reference):
    """Under the causal mask the VLM is Qwen2 over [image embeddings | text embeddings], which transformers can
    decode from `inputs_embeds`; left-padded prompts included."""
    model, reference = model_and_reference
    pixels, ids = prompts(batch=2, length=6, seed=6)
    text_mask = torch.ones_like(ids, dtype=torch.bool)
    ids[1, :2], text_mask[1, :2] = 0, False
    # the end token: one that the first prompt's greedy path reaches, so that stopping is compared too
    eos = model.generate(pixels, ids, text_mask, max_new_tokens=8, mask_kind="causal", eos_ids=(EOS,))[0][3]
    with torch.no_grad():  # [pads | image | prompt]: transformers' left padding, positions after the pads
        image_tokens = model.image_tokens(pixels)
        sequences = [torch.cat([image, model.language.embed_tokens(row[real])])
                     for image, row, real in zip(image_tokens, ids, text_mask)]
        longest = max(len(sequence) for sequence in sequences)
        embeds = torch.stack([F.pad(sequence, (0, 0, longest - len(sequence), 0)) for sequence in sequences])
        attention_mask = torch.stack([torch.arange(longest) >= longest - len(sequence) for sequence in sequences])
        expected = reference.generate(inputs_embeds=embeds, attention_mask=attention_mask.long(), max_new_tokens=8,
                                      do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=eos)
    got = model.generate(pixels, ids, text_mask, max_new_tokens=8, mask_kind="causal", eos_ids=(eos,))
    expected = [row[:row.index(eos)] if eos in row else row for row in expected.tolist()]  # ours stop before it
    assert got == expected
    assert len(got[0]) <= 3  # the end token was reached


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])  # 2 favours long captions, 0 short ones
def test_beam_search_equals_transformers_generate(model_and_reference, length_penalty):
    """Beam search of width 3, with an end token that the beams do reach (the commonest token of the greedy
    captions), against transformers' beam search with its defaults, on the same weights under the causal mask."""
    model, reference = model_and_reference
    hypotheses_ended = 0
    for seed in range(12):
        pixels, ids = prompts(batch=3, length=5, seed=seed)
        text_mask = torch.ones_like(ids, dtype=torch.bool)
        greedy = model.generate(pixels, ids, text_mask, max_new_tokens=10, mask_kind="causal", eos_ids=(EOS,))
        end = collections.Counter(token for caption in greedy for token in caption[1:]).most_common(1)[0][0]
        with torch.no_grad():
            embeds = torch.cat([model.image_tokens(pixels), model.language.embed_tokens(ids)], dim=1)
            expected = reference.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                          max_new_tokens=8, do_sample=False, num_beams=3, length_penalty=length_penalty,
                                          eos_token_id=end, pad_token_id=end)
        expected = [[token for token in row if token != end] for row in expected.tolist()]  # its end and padding
        got = model.generate(pixels, ids, text_mask, max_new_tokens=8, num_beams=3, mask_kind="causal", eos_ids=(end,),
                             length_penalty=length_penalty)
        assert got == expected, seed
        hypotheses_ended += sum(len(caption) < 8 for caption in got)
    assert hypotheses_ended > 0  # the end token decided something


def test_no_new_tokens_is_an_empty_answer(model_and_reference):
    model, _ = model_and_reference
    pixels, ids = prompts(batch=2, seed=7)
    for num_beams in (1, 3):
        assert model.generate(pixels, ids, torch.ones_like(ids, dtype=torch.bool), max_new_tokens=0,
                              num_beams=num_beams, eos_ids=(EOS,)) == [[], []]

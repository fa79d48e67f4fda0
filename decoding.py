"""Decoding: captions and answers token by token from the KV cache, by greedy search or beam search.

VLM.generate runs the prompt through the model once (the prefill, under the training mask) and hands the last
position's logits to `greedy` or `beam_search`, which call a Decoder for each new token.
"""
import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values of the tokens seen so far, one pair per layer, for decoding token by token."""

    def __init__(self):
        self.layers = {}

    def update(self, layer, k, v):
        if layer in self.layers:
            past_k, past_v = self.layers[layer]
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        self.layers[layer] = (k, v)
        return k, v

    def reorder(self, batch_index):  # beam search keeps the surviving beams' histories
        self.layers = {i: (k[batch_index], v[batch_index]) for i, (k, v) in self.layers.items()}


class Decoder:
    """Feeds one new token per sequence through the language model, attending to every real token so far."""

    def __init__(self, language, cache, real, eos_ids):
        self.language, self.cache, self.real = language, cache, real
        self.eos_ids = torch.tensor(eos_ids, device=real.device)
        self.next_position = real.long().sum(1)

    def __call__(self, tokens):
        self.real = torch.cat([self.real, torch.ones_like(self.real[:, :1])], dim=1)
        mask = self.real[:, None, None, :]  # the new token sees every real token before it, image included
        rope = self.language.rope(self.next_position[:, None])
        hidden = self.language.hidden_states(self.language.embed_tokens(tokens[:, None]), mask, rope, self.cache)
        self.next_position = self.next_position + 1
        return self.language.lm_head(hidden[:, -1]).float()

    def reorder(self, batch_index):
        self.cache.reorder(batch_index)
        self.real, self.next_position = self.real[batch_index], self.next_position[batch_index]

    def is_end(self, tokens):
        return torch.isin(tokens, self.eos_ids)


def greedy(step, logits, max_new_tokens, on_token=None):
    """Argmax decoding: each sample's tokens up to, not including, its end token."""
    batch = logits.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=logits.device)
    out = [[] for _ in range(batch)]
    for i in range(max_new_tokens):
        tokens = logits.argmax(-1)
        ended = step.is_end(tokens) | done
        for b in (~ended).nonzero().flatten().tolist():
            out[b].append(tokens[b].item())
        if on_token is not None:
            on_token(torch.where(ended, -1, tokens))
        done = ended
        if done.all() or i == max_new_tokens - 1:
            break
        logits = step(tokens)
    return out


def beam_search(step, logits, max_new_tokens, num_beams, length_penalty):
    """The most probable continuation of each prompt, searched with `num_beams` beams as transformers' beam
    search does with its defaults (a test compares the two). Each step ranks the beams' continuations; of the
    best `num_beams`, those that end (an end token, or the last token allowed) become finished hypotheses, scored
    log-probability / length**length_penalty (the end token counted), and each prompt keeps its best
    `num_beams` of them; the best continuations that do not end run on. A prompt is done once it holds
    `num_beams` hypotheses and its best running beam, scored at its current length, cannot beat the worst."""
    batch, vocab = logits.shape[0] // num_beams, logits.shape[1]
    device = logits.device
    n_candidates = (1 + max(1, len(step.eos_ids))) * num_beams  # enough to leave num_beams that do not end
    scores = torch.full((batch, num_beams), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: let only the first one expand
    histories = [[] for _ in range(batch * num_beams)]
    finished = [[] for _ in range(batch)]  # (score, tokens), best first, at most num_beams
    done = [max_new_tokens == 0] * batch
    for length in range(1, max_new_tokens + 1):
        candidates = (scores[:, :, None] + F.log_softmax(logits, dim=-1).view(batch, num_beams, vocab)).view(batch, -1)
        top_scores, top_index = candidates.topk(n_candidates, dim=-1)
        ends_with_token = step.is_end(top_index % vocab).tolist()
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        running = []  # (score, token, beam it extends, tokens so far) for every beam of every prompt, in order
        for b in range(batch):
            beams = []
            if not done[b]:
                ranked = [(score, b * num_beams + index // vocab, index % vocab, ends)
                          for score, index, ends in zip(top_scores[b], top_index[b], ends_with_token[b])]
                beams, finished[b] = beam_step(ranked, histories, finished[b], num_beams, length,
                                               length == max_new_tokens, length_penalty)
                best_running = beams[0][0] / length ** length_penalty if beams else float("-inf")
                done[b] = len(finished[b]) == num_beams and best_running <= finished[b][-1][0]
            idle = range(b * num_beams + len(beams), (b + 1) * num_beams)  # a done prompt's beams stay in place
            running += beams + [(float("-inf"), 0, beam, []) for beam in idle]
        if all(done) or length == max_new_tokens:
            break
        new_scores, tokens, sources, histories = zip(*running)
        scores = torch.tensor(new_scores, device=device).view(batch, num_beams)
        step.reorder(torch.tensor(sources, device=device))
        logits = step(torch.tensor(tokens, device=device))
    return [f[0][1] if f else [] for f in finished]


def beam_step(ranked, histories, finished, num_beams, length, last, length_penalty):
    """One prompt's step of beam search. `ranked`: its candidate continuations (score, beam, token, whether
    the token ends), best first. Returns the beams that run on, (score, token, beam, tokens), and the
    prompt's finished hypotheses."""
    running = []
    for rank, (score, beam, token, ends) in enumerate(ranked):
        if ends or last:
            if rank < num_beams:  # only the best num_beams continuations may finish
                tokens = histories[beam] if ends else histories[beam] + [token]
                finished = sorted(finished + [(score / length ** length_penalty, tokens)], key=lambda h: -h[0])[:num_beams]
        elif len(running) < num_beams:
            running.append((score, token, beam, histories[beam] + [token]))
    return running, finished

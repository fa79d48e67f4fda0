"""The attention masks of the paper (section 3.2, Figure 3) and the stage-0 input noise (Algorithm 1).

A mask is a boolean matrix C where C[i, j] is True when token i may attend to token j (the paper's green
cell) and False when it may not (red). Every sequence is [image tokens | text tokens] (paper 3.1), so a
mask only needs the sequence length and how many image tokens lead it:

    causal         LLaVA's choice, the baseline the paper argues against: each token sees itself and the past.
    prefix         stages 1-3, Fig. 3(b): image tokens see every image token (bidirectional) and no text;
                   text tokens see every image token and the text before them.
    bidirectional  stage 0, Fig. 3(a): every token sees every token. Since the next token is then visible,
                   20% of the text inputs are replaced by noise (`add_noise`) so the model cannot copy it.

`python masks.py` draws (a) and (b) as a PNG in the paper's green/red style.
"""
import torch

MASK_KINDS = ("causal", "prefix", "bidirectional")


def causal(seq_len):
    return torch.ones(seq_len, seq_len, dtype=torch.bool).tril()


def prefix(seq_len, n_image_tokens):
    allowed = causal(seq_len)
    allowed[:n_image_tokens, :n_image_tokens] = True  # the image block is unmasked (paper 3.2)
    return allowed


def bidirectional(seq_len):
    return torch.ones(seq_len, seq_len, dtype=torch.bool)


def base_mask(mask_kind, seq_len, n_image_tokens):
    if mask_kind == "causal":
        return causal(seq_len)
    if mask_kind == "prefix":
        return prefix(seq_len, n_image_tokens)
    if mask_kind == "bidirectional":
        return bidirectional(seq_len)
    raise ValueError(f"unknown mask_kind {mask_kind!r}; expected one of {MASK_KINDS}")


def attention_mask(mask_kind, n_image_tokens, keep):
    """The batch mask [B, 1, S, S] for sequences whose real tokens are marked True in `keep` [B, S].

    Padding keys are hidden from every query. Each token may always attend to itself, so a padding query
    never has an empty row (an all-masked softmax row is NaN, which would poison the gradients)."""
    seq_len = keep.shape[1]
    allowed = base_mask(mask_kind, seq_len, n_image_tokens).to(keep.device)
    allowed = allowed[None] & keep[:, None, :]
    allowed |= torch.eye(seq_len, dtype=torch.bool, device=keep.device)
    return allowed[:, None]


def add_noise(input_ids, noisy_positions, prob=0.2, noise_token_id=None, vocab_size=None, generator=None):
    """Algorithm 1, line 3: replace a fraction `prob` of the text inputs by noise.

    Only the inputs change; the caller keeps the clean ids as labels, so the model must predict the true
    next token without being able to read it. `noisy_positions` marks the positions eligible for noise
    (the real text tokens). The noise is `noise_token_id` when given, else a uniformly random token."""
    hit = torch.rand(input_ids.shape, generator=generator, device=input_ids.device) < prob
    hit &= noisy_positions
    if noise_token_id is not None:
        noise = torch.full_like(input_ids, noise_token_id)
    else:
        noise = torch.randint(0, vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
    return torch.where(hit, noise, input_ids)


def draw(path="masks.png", n_image_tokens=4, n_text_tokens=4):
    """Figure 3 (a) and (b): green = may attend, red = masked."""
    import numpy as np
    from PIL import Image, ImageDraw

    seq_len, cell, gap = n_image_tokens + n_text_tokens, 28, 40
    panels = [("(a) stage 0: bidirectional", bidirectional(seq_len)),
              ("(b) stages 1-3: prefix", prefix(seq_len, n_image_tokens))]
    side = seq_len * cell
    canvas = Image.new("RGB", (2 * side + 3 * gap, side + 2 * gap), "white")
    pen = ImageDraw.Draw(canvas)
    for k, (title, allowed) in enumerate(panels):
        x0, y0 = gap + k * (side + gap), gap
        pen.text((x0, 10), title, fill="black")
        for i, j in np.ndindex(seq_len, seq_len):
            color = (60, 170, 80) if allowed[i, j] else (210, 60, 60)
            box = (x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell - 2, y0 + (i + 1) * cell - 2)
            pen.rectangle(box, fill=color)
        pen.text((x0, y0 + side + 8), f"first {n_image_tokens} = image, last {n_text_tokens} = text", fill="black")
    canvas.save(path)
    return path


if __name__ == "__main__":
    print("wrote", draw())

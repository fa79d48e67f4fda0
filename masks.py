"""The attention masks of the paper (section 3.2, Fig. 3) and the stage-0 input noise (Algorithm 1).

A mask is a boolean matrix C where C[i, j] is True when token i may attend to token j (the paper's green
cell) and False when it may not (red). Every sequence is [image tokens | text tokens] (section 3.1), so a
mask only needs the sequence length and how many image tokens lead it:

    causal         LLaVA's choice, the baseline the paper argues against: each token sees itself and the past.
    prefix         stages 1-3, Fig. 3(b): image tokens see every image token (bidirectional) and no text;
                   text tokens see every image token and the text before them.
    prefix_prompt  PaliGemma's prefix-LM, one step beyond the paper: the image and the prompt (every token
                   before the first answer token) see each other both ways; the answers stay causal.
    bidirectional  stage 0, Fig. 3(a): every token sees every token. Since the next token is then visible,
                   20% of the text inputs are replaced by noise (`add_noise`) so the model cannot copy it.

A batch is rows of such sequences, "documents" (data.collate: one per row, then padding; data.pack_documents:
several per row). `document` [R, L] numbers each row's documents 0, 1, ... and marks padding -1; each
document is masked as if it had a row of its own (`attention_mask`). `python masks.py` draws the masks.
"""
import torch

MASK_KINDS = ("causal", "prefix", "prefix_prompt", "bidirectional")


def causal(seq_len, device=None):
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()


def prefix(seq_len, n_image_tokens, device=None):
    allowed = causal(seq_len, device)
    allowed[:n_image_tokens, :n_image_tokens] = True  # the image block is unmasked (section 3.2)
    return allowed


def prefix_prompt(seq_len, n_prefix_tokens, device=None):
    return prefix(seq_len, n_prefix_tokens, device)  # the same rule over a longer block: image and prompt


def bidirectional(seq_len, device=None):
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)


def check_kind(mask_kind):
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"unknown mask_kind {mask_kind!r}; expected one of {MASK_KINDS}")


def document_positions(document):
    """Each token's position inside its own document [R, L]: RoPE positions restart at every document."""
    index = torch.arange(document.shape[1], device=document.device).expand_as(document)
    starts = torch.ones_like(document, dtype=torch.bool)
    starts[:, 1:] = document[:, 1:] != document[:, :-1]
    # cummax carries each document's start index forward over its tokens
    return index - torch.where(starts, index, 0).cummax(1).values


def image_slots(document, n_image_tokens):
    """True where image tokens go: the first n_image_tokens positions of every document."""
    return (document_positions(document) < n_image_tokens) & (document >= 0)


def prefix_block(mask_kind, n_image_tokens, document, labelled=None):
    """The tokens [R, L] that see each other both ways within their document: its image slots (prefix); with
    prefix_prompt, also its prompt, every token before its first labelled one (`labelled` [R, L]; None: no
    labels, a prompt to be answered, all of it)."""
    image = image_slots(document, n_image_tokens)
    if mask_kind != "prefix_prompt":
        return image
    if labelled is None:
        return document >= 0
    start = torch.arange(document.shape[1], device=document.device) - document_positions(document)
    labels_so_far = labelled.long().cumsum(1)
    labels_before_start = (labels_so_far - labelled.long()).gather(1, start)
    return (document >= 0) & (labels_so_far == labels_before_start)  # no label yet in this document


def attention_mask(mask_kind, n_image_tokens, document, labelled=None):
    """The batch's mask [R, 1, L, L] for SDPA: within each document the rule of Fig. 3, across documents
    nothing. Padding keys are hidden from every query, and every token sees itself, so a padding query never
    has an empty row (an all-masked softmax row is NaN, which would poison the gradients)."""
    check_kind(mask_kind)
    both_ways = prefix_block(mask_kind, n_image_tokens, document, labelled)
    position = torch.arange(document.shape[1], device=document.device)
    earlier = position[None, :, None] >= position[None, None, :]          # key k <= query q: causal
    allowed = document[:, :, None] == document[:, None, :]                # a document sees only itself
    if mask_kind == "causal":
        allowed = allowed & earlier
    if mask_kind in ("prefix", "prefix_prompt"):  # Fig. 3(b): the prefix block unmasked
        allowed = allowed & (earlier | (both_ways[:, :, None] & both_ways[:, None, :]))
    itself = torch.eye(len(position), dtype=torch.bool, device=document.device)
    allowed = (allowed & (document >= 0)[:, None, :]) | itself
    return allowed[:, None]


def add_noise(input_ids, eligible, prob=0.2, noise_token_id=None, vocab_size=None, generator=None):
    """Algorithm 1, line 3: replace a fraction `prob` of the text inputs by noise.

    Only the inputs change; the caller keeps the clean ids as labels, so the model must predict the true
    next token without being able to read it. `eligible` marks the positions that may get noise (the real
    text tokens). The noise is `noise_token_id` when given, else a uniformly random token."""
    hit = torch.rand(input_ids.shape, generator=generator, device=input_ids.device) < prob
    hit &= eligible
    if noise_token_id is not None:
        noise = torch.full_like(input_ids, noise_token_id)
    else:
        noise = torch.randint(0, vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
    return torch.where(hit, noise, input_ids)


def draw(path="masks.png", n_image_tokens=4, n_text_tokens=4, n_prompt_tokens=2):
    """Figure 3 (a) and (b), and (c) PaliGemma's prefix over image and prompt: green = may attend, red = masked."""
    import numpy as np
    from PIL import Image, ImageDraw

    seq_len, cell, gap = n_image_tokens + n_text_tokens, 28, 40
    panels = [("(a) stage 0: bidirectional", bidirectional(seq_len)),
              ("(b) stages 1-3: prefix", prefix(seq_len, n_image_tokens)),
              (f"(c) prefix_prompt, {n_prompt_tokens} prompt", prefix_prompt(seq_len, n_image_tokens + n_prompt_tokens))]
    side = seq_len * cell
    canvas = Image.new("RGB", (len(panels) * (side + gap) + gap, side + 2 * gap), "white")
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

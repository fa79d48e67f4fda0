"""The attention masks of the paper (section 3.2, Figure 3) and the stage-0 input noise (Algorithm 1).

A mask is a boolean matrix C where C[i, j] is True when token i may attend to token j (the paper's green
cell) and False when it may not (red). Every sequence is [image tokens | text tokens] (paper 3.1), so a
mask only needs the sequence length and how many image tokens lead it:

    causal         LLaVA's choice, the baseline the paper argues against: each token sees itself and the past.
    prefix         stages 1-3, Fig. 3(b): image tokens see every image token (bidirectional) and no text;
                   text tokens see every image token and the text before them.
    bidirectional  stage 0, Fig. 3(a): every token sees every token. Since the next token is then visible,
                   20% of the text inputs are replaced by noise (`add_noise`) so the model cannot copy it.

The same rule comes in four forms: dense boolean matrices (`attention_mask`, for SDPA: the simple
reference), FlexAttention block masks (`block_mask`, whose kernel skips every 128x128 block that is fully
masked), for the prefix mask of right-padded rows its two blocks (`PrefixBlocks`), which the model runs as
two flash-attention calls with no mask at all, and segments of consecutive tokens that attend only within
themselves (`Segments`, for flash-attention's variable-length kernel: each document's mask is causal or
bidirectional but for its image block). Packed rows (data.pack_documents: several [image | text] documents in
one row, for variable-length conversations) give each document its own mask (`document_mask`, or
`block_mask` with `document`, or `Segments`), as if it had a row of its own.

`python masks.py` draws (a) and (b) as a PNG in the paper's green/red style.
"""
import torch
from torch.nn.attention.bias import causal_lower_right
from torch.nn.attention.flex_attention import create_block_mask, create_mask

MASK_KINDS = ("causal", "prefix", "bidirectional")


# `device`: build the mask where it is used; copying it from the CPU in the middle of a training step would
# make the host wait for the GPU.

def causal(seq_len, device=None):
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()


def prefix(seq_len, n_image_tokens, device=None):
    allowed = causal(seq_len, device)
    allowed[:n_image_tokens, :n_image_tokens] = True  # the image block is unmasked (paper 3.2)
    return allowed


def bidirectional(seq_len, device=None):
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)


def base_mask(mask_kind, seq_len, n_image_tokens, device=None):
    check_kind(mask_kind)
    if mask_kind == "causal":
        return causal(seq_len, device)
    if mask_kind == "prefix":
        return prefix(seq_len, n_image_tokens, device)
    return bidirectional(seq_len, device)


def check_kind(mask_kind):
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"unknown mask_kind {mask_kind!r}; expected one of {MASK_KINDS}")


def attention_mask(mask_kind, n_image_tokens, keep):
    """The batch mask [B, 1, S, S] for sequences whose real tokens are marked True in `keep` [B, S].

    Padding keys are hidden from every query. Each token may always attend to itself, so a padding query
    never has an empty row (an all-masked softmax row is NaN, which would poison the gradients)."""
    seq_len = keep.shape[1]
    allowed = base_mask(mask_kind, seq_len, n_image_tokens, keep.device)
    allowed = allowed[None] & keep[:, None, :]
    allowed |= torch.eye(seq_len, dtype=torch.bool, device=keep.device)
    return allowed[:, None]


class PrefixBlocks:
    """The prefix mask of right-padded rows, kept as its two blocks rather than as a matrix: the image block
    attends to itself with no mask, and the text attends to every image token and causally to earlier text,
    which is a causal mask aligned at the bottom right of the [text x (image + text)] block (`text_causal`,
    a description that SDPA turns into a flash-attention call, not a matrix). Right padding needs nothing
    more: a real token never looks to its right, where the pads are. model.attend runs each block with a
    flash-attention kernel, and no S x S mask exists at all.
    Built once per batch, outside the compiled blocks: torch.compile cannot build `text_causal` inside a
    compiled graph (it would split each block's graph in six), but takes it as an input."""

    def __init__(self, n_image_tokens, seq_len):
        self.n_image_tokens = n_image_tokens
        self.text_causal = causal_lower_right(seq_len - n_image_tokens, seq_len)


def add_noise(input_ids, eligible, prob=0.2, noise_token_id=None, vocab_size=None, generator=None):
    """Algorithm 1, line 3: replace a fraction `prob` of the text inputs by noise.

    Only the inputs change; the caller keeps the clean ids as labels, so the model must predict the true
    next token without being able to read it. `eligible` marks the positions that may get noise
    (the real text tokens). The noise is `noise_token_id` when given, else a uniformly random token."""
    hit = torch.rand(input_ids.shape, generator=generator, device=input_ids.device) < prob
    hit &= eligible
    if noise_token_id is not None:
        noise = torch.full_like(input_ids, noise_token_id)
    else:
        noise = torch.randint(0, vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
    return torch.where(hit, noise, input_ids)


# -----------------------------------------------------------------------------
# Packed rows and FlexAttention block masks

def run_starts(labels):
    """True where a run of equal labels starts in its row [R, L] (every row's first token included)."""
    starts = torch.ones_like(labels, dtype=torch.bool)
    starts[:, 1:] = labels[:, 1:] != labels[:, :-1]
    return starts


def document_positions(document):
    """Each token's position inside its own document: RoPE positions restart at every document's start."""
    index = torch.arange(document.shape[1], device=document.device).expand_as(document)
    # cummax carries each document's start index forward over its tokens
    return index - torch.where(run_starts(document), index, 0).cummax(1).values


def image_slots(document, n_image_tokens):
    """True where image tokens go: the first n_image_tokens positions of every document."""
    return (document_positions(document) < n_image_tokens) & (document >= 0)


def mask_mod(mask_kind, image, keep, document):
    """The mask one entry at a time, as FlexAttention takes it: may query q of row b attend to key k?

    The rule of `attention_mask`, within each document of a packed row; with one document per row (all
    `document` 0) it is exactly `attention_mask`. `image` marks the image slots (`image_slots`)."""
    check_kind(mask_kind)

    def may_attend(b, h, q, k):
        allowed = document[b, q] == document[b, k]                           # a document sees only itself
        if mask_kind == "causal":
            allowed = allowed & (k <= q)
        if mask_kind == "prefix":
            allowed = allowed & ((k <= q) | (image[b, q] & image[b, k]))   # Fig. 3(b): image block bidirectional
        return (allowed & keep[b, k]) | (q == k)                            # pads hidden; each token sees itself
    return may_attend


def block_mask(mask_kind, n_image_tokens, keep, document=None, fixed=None):
    """`attention_mask` (or, given `document`, `document_mask`) as a FlexAttention BlockMask, built once per
    batch: it lists, per 128-token query block, the key blocks that are not fully masked, and the kernel
    computes only those (for the prefix mask, 11 of 16 at 256 image + 144 text tokens, bench.py's stage-2 shape;
    nearer half for long texts).

    `fixed(name, tensor)`, where given (model.FixedInputs, for CUDA graphs), returns the tensor's values in
    memory that every batch of its shape reuses; it takes the mask's own tensors and those its rule reads."""
    if document is None:
        document = torch.zeros_like(keep, dtype=torch.long)  # one document per row
    batch, seq_len = keep.shape
    keep, document = placed(fixed, "keep", keep), placed(fixed, "document", document)
    image = placed(fixed, "image", image_slots(document, n_image_tokens))
    mask = create_block_mask(mask_mod(mask_kind, image, keep, document), batch, None, seq_len, seq_len, device=keep.device)
    for name, value in vars(mask).items():  # the block lists (their names and number vary between torch versions)
        if isinstance(value, torch.Tensor):
            setattr(mask, name, placed(fixed, name, value))
    return mask


def placed(fixed, name, tensor):
    """The tensor, or its values in FixedInputs' memory for its name and shape where `fixed` is given."""
    return tensor if fixed is None else fixed(name, tensor)


class Segments:
    """The stage's mask as segments of consecutive tokens, each attending only within itself, for
    flash-attention's variable-length kernel (model.segment_attention): no mask exists, and no masked block is
    computed.

    The rows are laid end to end. `documents` cuts them into each document (a right-padded row, as training
    batches come, holds one) and each run of padding at a row's end: the causal and bidirectional masks are
    these segments, attended causally or both ways. The prefix mask (Fig. 3(b)) is the causal one except in
    the image block, which sees itself whole: a second pass over `parts`, where every image block is a
    segment of its own (and every text, whose result goes unused), gives the rows marked in `image` [R*L].
    Pads see the pads of their segment instead of only themselves: their rows reach nothing else, and carry
    no label.

    The boundaries (int32, cumulative, as the kernel takes them) have one length per batch shape, the unused
    ones repeating the end (empty segments), so that a CUDA graph replays every batch of a shape."""

    def __init__(self, mask_kind, n_image_tokens, keep, document=None, fixed=None):
        check_kind(mask_kind)
        rows, seq_len = keep.shape
        if document is None:
            document, most_documents = torch.where(keep, 0, -1), 1  # a right-padded row: one document, then pads
        else:
            most_documents = seq_len // n_image_tokens  # a document holds at least its image block
        image = image_slots(document, n_image_tokens)
        self.mask_kind, self.max_len = mask_kind, seq_len
        self.documents = placed(fixed, "documents", segment_boundaries(document, rows * (most_documents + 1)))
        # document d's image labelled 2d, its text 2d + 1, padding -1: neighbours always differ
        parts = segment_boundaries(2 * document + ~image, rows * (2 * most_documents + 1))
        self.parts, self.image = placed(fixed, "parts", parts), placed(fixed, "image", image.flatten())


def segment_boundaries(labels, count):
    """Where the runs of equal labels in each row [R, L] start, the rows laid end to end, as min(`count`, number
    of tokens) + 1 int32 boundaries: the starts in order, then the end, repeated for the segments that do not
    exist. Sorted, not selected, so that nothing waits for the GPU to count them; more starts than `count` (a
    layout Segments does not take) stop the GPU with an error rather than merge segments."""
    starts = run_starts(labels)
    torch._assert_async(starts.sum() <= count, "more segments than boundaries: masks.Segments takes right-padded "
                                               "or packed rows")
    end = labels.numel()
    first = torch.where(starts.flatten(), torch.arange(end, device=labels.device), end).sort().values[:min(count, end)]
    return torch.cat([first, first.new_full((1,), end)]).int()


def segment_mask(boundaries, n_tokens, is_causal):
    """The dense [n_tokens, n_tokens] mask of segment boundaries (Segments): each token sees its own segment
    (with `is_causal`, only up to itself). What the variable-length kernel computes, for SDPA."""
    position = torch.arange(n_tokens, dtype=boundaries.dtype, device=boundaries.device)
    segment = torch.searchsorted(boundaries, position, right=True)
    allowed = segment[:, None] == segment[None, :]
    return allowed & (position[None, :] <= position[:, None]) if is_causal else allowed


def document_mask(mask_kind, n_image_tokens, document):
    """The dense [B, 1, S, S] mask of packed rows, for SDPA: each document under its own mask."""
    batch, seq_len = document.shape
    may_attend = mask_mod(mask_kind, image_slots(document, n_image_tokens), document >= 0, document)
    return create_mask(may_attend, batch, 1, seq_len, seq_len, device=document.device)


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

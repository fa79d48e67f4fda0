"""The fast path: what model.py computes, in the forms fast GPU kernels take (train.py's `fast_path` setting).

model.py is the reference: SDPA under the dense [L, L] mask of masks.attention_mask, and F.cross_entropy over
the logits of every position. On a GPU both waste work: a dense mask keeps SDPA off its flash kernels and
computes every masked score, and a micro-batch's logits over Qwen2's 151,936 words take gigabytes. This module
computes the same numbers another way; tests/test_fast_path.py proves each piece equal to the reference.

    PrefixBlocks      the prefix mask of right-padded rows as two flash-attention calls, no mask tensor
    FlexMask          the other masks (prefix_prompt too) and packed rows as FlexAttention block masks:
                      fully masked blocks are skipped
    next_token_loss   the output layer only at labelled positions, a chunk at a time, gradients in the forward
    compile_blocks    each block compiled, optionally replayed as a CUDA graph (FixedInputs, own_gradients)

After `use_fast_path(model)`, VLM.hidden_states asks `FastPath.inputs` for the mask and RoPE tables,
VLM.forward asks `FastPath.next_token_loss` for the loss, and model.attend runs the mask object it is handed.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import masks
from model import IGNORE_INDEX, find_label_positions

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile's modes that record CUDA graphs

# FlexAttention is fast only compiled (one fused kernel); eager, the CPU's only form, it is a slow reference.
# Inside compiled blocks it is compiled with them.
fused_flex_attention = torch.compile(flex_attention, dynamic=False)


def use_fast_path(model):
    """Put the model on the fast path: its masks and loss come from here (VLM.hidden_states, VLM.forward)."""
    model.fast_path = FastPath()
    return model


class FastPath:
    """What the model asks of the fast path for each batch: the mask and RoPE tables, and the loss."""

    def __init__(self):
        self.fixed = None  # FixedInputs, once the blocks replay as CUDA graphs

    def inputs(self, mask_kind, n_image_tokens, document, rope, packed, labelled=None):
        """The stage's mask in the form its kernel takes, and the RoPE tables (under CUDA graphs, in FixedInputs)."""
        masks.check_kind(mask_kind)
        if mask_kind == "prefix" and not packed:  # right-padded rows, one document each (data.collate)
            one_document_per_row = ((document[:, 0] == 0) & (document.amax(1) == 0)).all()
            torch._assert_async(one_document_per_row, "PrefixBlocks takes one right-padded document per row")
            mask = PrefixBlocks(n_image_tokens, document.shape[1])
        else:
            mask = FlexMask(block_mask(mask_kind, n_image_tokens, document, labelled, self.fixed))
        if self.fixed is not None:
            rope = tuple(self.fixed(name, table) for name, table in zip(("cos", "sin"), rope))
        return mask, rope

    def next_token_loss(self, hidden, labels, label_positions, weight):
        """The reference's loss (model.VLM.forward), computed only at the labelled positions."""
        if label_positions is None:
            label_positions = find_label_positions(labels)  # the host waits for the GPU to count them
        # checked on the device, no wait: a label at a row's start would be "predicted" by the row above
        torch._assert_async((labels[:, 0] == IGNORE_INDEX).all(), "a row starts with a labelled token, not its image")
        # the token before each labelled one predicts it (a row starts with an image slot: never the row above)
        return next_token_loss(weight, hidden.flatten(0, 1)[label_positions - 1], labels.flatten()[label_positions])


# -----------------------------------------------------------------------------
# Attention: the masks as the kernels take them

class PrefixBlocks:
    """The prefix mask of right-padded rows (Fig. 3(b)) as its two blocks: the image block attends to itself
    with no mask; the text attends to every image token and causally to earlier text, a causal mask aligned at
    the bottom right of the [text x (image + text)] block, which SDPA runs as a flash-attention call, not a
    matrix. Right padding needs nothing more: a real token never looks right, where the pads are. Built outside
    the compiled blocks (building `text_causal` inside one would break its graph)."""

    def __init__(self, n_image_tokens, seq_len):
        self.n_image_tokens = n_image_tokens
        self.text_causal = causal_lower_right(seq_len - n_image_tokens, seq_len)

    def attend(self, q, k, v):
        n, gqa = self.n_image_tokens, k.shape[1] != q.shape[1]
        image = F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], enable_gqa=gqa)
        text = F.scaled_dot_product_attention(q[:, :, n:], k, v, attn_mask=self.text_causal, enable_gqa=gqa)
        return torch.cat([image, text], dim=2)


class FlexMask:
    """A FlexAttention BlockMask (block_mask) for model.attend: compiled FlexAttention on the GPU."""

    def __init__(self, block_mask):
        self.block_mask = block_mask

    def attend(self, q, k, v):
        flex = fused_flex_attention if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=self.block_mask, enable_gqa=k.shape[1] != q.shape[1])


def mask_mod(mask_kind, both_ways, document):
    """masks.attention_mask one entry at a time, as FlexAttention takes it: may query q of row b attend to key
    k? `both_ways` marks each document's prefix block (masks.prefix_block)."""
    def may_attend(b, h, q, k):
        allowed = document[b, q] == document[b, k]                         # a document sees only itself
        if mask_kind == "causal":
            allowed = allowed & (k <= q)
        if mask_kind in ("prefix", "prefix_prompt"):  # Fig. 3(b): the prefix block bidirectional
            allowed = allowed & ((k <= q) | (both_ways[b, q] & both_ways[b, k]))
        return (allowed & (document[b, k] >= 0)) | (q == k)               # pads hidden; each token sees itself
    return may_attend


def block_mask(mask_kind, n_image_tokens, document, labelled=None, fixed=None):
    """masks.attention_mask as a FlexAttention BlockMask, built once per batch: per 128-token query block it
    lists the key blocks that are not fully masked, and the kernel computes only those (for the prefix mask, 11
    of 16 at 256 image + 144 text tokens, bench.py's stage-2 shape; nearer half for long texts).

    `fixed` (FixedInputs, for CUDA graphs), where given, holds the mask's tensors and those its rule reads in
    memory that every batch of their shape reuses."""
    rows, seq_len = document.shape
    document = placed(fixed, "document", document)
    both_ways = placed(fixed, "both_ways", masks.prefix_block(mask_kind, n_image_tokens, document, labelled))
    mask = create_block_mask(mask_mod(mask_kind, both_ways, document), rows, None, seq_len, seq_len,
                             device=document.device)
    for name, value in vars(mask).items():  # the block lists (their names and number vary between torch versions)
        if isinstance(value, torch.Tensor):
            setattr(mask, name, placed(fixed, name, value))
    return mask


def placed(fixed, name, tensor):
    return tensor if fixed is None else fixed(name, tensor)


# -----------------------------------------------------------------------------
# The loss: the output layer a chunk at a time

def next_token_loss(weight, rows, targets, chunk_size=4096):
    """Mean cross-entropy of hidden states `rows` [N, D] through the output layer `weight` against `targets` [N],
    a chunk of rows at a time, so that the [N, vocab] logits never exist whole (4096 rows hold a stage-2
    micro-batch's labels: 1.2 GB of bf16 logits). When training, each chunk's gradients are computed at once
    (LinearCrossEntropy) and its logits dropped. IGNORE_INDEX targets add nothing but count in the mean."""
    if len(targets) == 0:
        raise ValueError("no token of the batch carries a label: there is no loss to compute")
    if torch.is_grad_enabled() and (weight.requires_grad or rows.requires_grad):
        return LinearCrossEntropy.apply(weight, rows, targets, chunk_size) / len(targets)
    return linear_cross_entropy(weight, rows, targets, chunk_size)[0] / len(targets)


class LinearCrossEntropy(torch.autograd.Function):
    """The summed loss of linear_cross_entropy, with gradients computed in the forward pass. The loss is the
    last operation of the step, so nothing downstream can change its gradient but a scale: computing it while
    the logits are at hand saves storing them, or recomputing them in the backward pass."""

    @staticmethod
    def forward(ctx, weight, rows, targets, chunk_size):
        want_weight, want_rows = ctx.needs_input_grad[:2]
        total, ctx.grad_weight, ctx.grad_rows = linear_cross_entropy(weight, rows, targets, chunk_size, want_weight,
                                                                     want_rows)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        scaled = lambda grad: None if grad is None else grad * grad_total
        return scaled(ctx.grad_weight), scaled(ctx.grad_rows), None, None


def linear_cross_entropy(weight, rows, targets, chunk_size, want_weight_grad=False, want_rows_grad=False):
    """Sum over rows of -log softmax(row @ weight.T)[target], a chunk of rows at a time, and the gradients of
    that sum with respect to `weight` and `rows` when asked (else None). The matmuls run in the autocast dtype,
    the softmax in fp32, and the gradients come back in the dtypes of `weight` and `rows`."""
    device = rows.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    matmul_weight = weight.to(dtype)  # cast once, not once per chunk
    total = torch.zeros((), dtype=torch.float32, device=rows.device)
    grad_weight = None  # the first chunk's, in weight's dtype; the later chunks add to it
    grad_rows = torch.empty_like(rows) if want_rows_grad else None
    for i in range(0, len(targets), chunk_size):
        x = rows[i:i + chunk_size].to(dtype)
        logits = F.linear(x, matmul_weight)
        softmax_loss = fused_softmax_cross_entropy if logits.is_cuda else softmax_cross_entropy
        loss, grad_logits = softmax_loss(logits, targets[i:i + chunk_size])
        total += loss
        if want_rows_grad:
            grad_rows[i:i + chunk_size] = grad_logits @ matmul_weight
        if want_weight_grad:
            chunk_grad = grad_logits.T @ x
            grad_weight = chunk_grad.to(weight.dtype) if grad_weight is None else grad_weight.add_(chunk_grad)
    return total, grad_weight, grad_rows


def softmax_cross_entropy(logits, targets):
    """Summed cross-entropy of logits [N, V] (in fp32) against targets [N], and its gradient with respect to the
    logits, softmax - one-hot, in the logits' dtype. A target of IGNORE_INDEX adds nothing to either."""
    counted = (targets != IGNORE_INDEX)[:, None]
    targets = targets.clamp(min=0)[:, None]  # an ignored row is multiplied by 0 below
    log_probs = logits.float().log_softmax(-1)
    loss = -(log_probs.gather(1, targets) * counted).sum()
    one_hot = torch.arange(logits.shape[1], device=logits.device) == targets
    grad = (log_probs.exp() - one_hot.float()) * counted
    return loss, grad.to(logits.dtype)


# On the GPU, compiled: one kernel finds each row's log-sum-exp and another writes the gradient, reading the
# logits twice where the eager ops above read and write fp32 copies of them about ten times. Any number of rows.
fused_softmax_cross_entropy = torch.compile(softmax_cross_entropy, dynamic=True)


# -----------------------------------------------------------------------------
# Compiled blocks and CUDA graphs

def compile_blocks(model, mode="default", max_shapes=64):
    """torch.compile each transformer block ("regional" compilation): the 27 vision and 24 language blocks share
    two graphs, and inside a block the norms, activations and RoPE fuse around the matmuls and FlexAttention
    becomes one kernel. The language blocks' shapes stay static (the fastest kernels; dynamic FlexAttention
    fails to compile on the CPU): each batch shape compiles anew, up to `max_shapes` (past torch's default of
    8 a block would silently run eagerly), so pad batches to a few lengths. A mode in CUDA_GRAPH_MODES also
    replays each block as a CUDA graph (at micro-batch 16 the GPU runs a block faster than Python launches its
    kernels); the per-batch inputs then go through FixedInputs, where the graphs were recorded."""
    config = torch._dynamo.config  # cache_size_limit: the name for the recompile limit in every torch >= 2.5
    config.cache_size_limit = max(config.cache_size_limit, max_shapes)
    if mode in CUDA_GRAPH_MODES:
        if model.fast_path is None:
            raise ValueError(f"compile mode {mode!r} replays CUDA graphs, whose inputs the fast path keeps in place: "
                             "use_fast_path(model) first")
        model.fast_path.fixed = FixedInputs()
    for block in model.language.layers:
        block.compile(mode=mode, dynamic=False)
    # packed micro-batches hold varying numbers of images: after the first change, the vision blocks are
    # compiled once more for any number (their one other dimension, the patches, never changes)
    for block in model.vision.layers:
        block.compile(mode=mode, dynamic=None)


class FixedInputs:
    """Buffers that hold the blocks' per-batch inputs (RoPE's tables, the mask and what its rule reads) at the
    same addresses, batch after batch: a block replayed as a CUDA graph that finds one elsewhere is recorded
    again (on an H100, stage 0 ran at 52 images/s instead of 185). One buffer per name and shape, which the next
    batch of that shape overwrites: its backward pass has run by then."""

    def __init__(self):
        self.buffers = {}

    def __call__(self, name, tensor):
        key = (name, tuple(tensor.shape), tensor.dtype, tensor.device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty_like(tensor)
        return self.buffers[key].copy_(tensor)


def uses_cuda_graphs(cfg):
    """Whether train.py's settings replay the blocks as CUDA graphs."""
    return cfg["fast_path"] and cfg["compile"] and cfg["compile_mode"] in CUDA_GRAPH_MODES


def cuda_graphs_refused(cfg):
    """Why train.py's settings cannot replay the blocks as CUDA graphs (measured on an H200), or None."""
    if cfg["gradient_checkpointing"]:
        return ("gradient_checkpointing: running the blocks again in the backward pass breaks CUDA graph recording "
                "(torch 2.11: 'graph recording observed an input tensor deallocate')")
    return None


def own_gradients(model):
    """CUDA graphs hand the compiled blocks' parameter gradients back in their own memory, which the next
    micro-batch's replay overwrites (pytorch/pytorch#169545: accumulated gradients come out wrong, or the step
    fails). Copied out once, after the first micro-batch, the later ones are added to them in place."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad = p.grad.clone()

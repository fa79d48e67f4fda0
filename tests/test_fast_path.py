"""The fast path computes what the simple path computes: FlexAttention block masks and the prefix mask by
blocks (flash) against SDPA with the dense mask (forward and gradients, padded and packed), the chunked loss
against full logits, packed rows against one sample per row, and compiled blocks against eager ones. Small
random models on the CPU."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

import data
import masks
import model as model_module
from model import IGNORE_INDEX, VLM, Qwen2Config, SigLIPConfig, VLMConfig, attend, next_token_loss

torch.set_num_threads(2)
N_IMAGE = 4  # 2x2 patches
VOCAB = 97


def tiny_vlm(seed=0):
    torch.manual_seed(seed)
    config = VLMConfig(SigLIPConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4),
                       Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2), projector_hidden=32)
    return VLM(config)


def padded_batch(lengths, seed=0):
    """Right-padded texts of the given lengths; the first two tokens of each are a prompt without loss."""
    generator = torch.Generator().manual_seed(seed)
    T = max(lengths)
    input_ids = torch.randint(0, VOCAB, (len(lengths), T), generator=generator)
    text_mask = torch.arange(T) < torch.tensor(lengths)[:, None]
    labels = torch.where(text_mask, input_ids, IGNORE_INDEX)
    labels[:, :2] = IGNORE_INDEX
    return {"pixel_values": torch.randn(len(lengths), 3, 28, 28, generator=generator), "input_ids": input_ids,
            "labels": labels, "text_mask": text_mask}


def samples_of(batch):
    """The padded batch as data.collate's samples, pads cut off."""
    return [{"pixel_values": batch["pixel_values"][i], "input_ids": batch["input_ids"][i][keep],
             "labels": batch["labels"][i][keep]} for i, keep in enumerate(batch["text_mask"])]


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """torch refuses FlexAttention's backward on the CPU with a front-end check (its fast kernels are GPU
    kernels); the eager reference implementation that runs here differentiates fine. Lift the check, so the
    gradients can be compared here; bench.py runs the compiled kernels on the GPU."""
    import torch.nn.attention.flex_attention as flex_attention
    monkeypatch.setattr(flex_attention, "_validate_device", lambda *tensors: None)


# --- the masks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_kind", masks.MASK_KINDS)
def test_mask_mod_is_the_dense_mask_entry_by_entry(mask_kind):
    keep = torch.ones(3, 10, dtype=torch.bool)
    keep[1, 7:] = False    # right padding
    keep[2, 4:6] = False   # left padding of the prompt after the image (generation)
    one_document = torch.zeros(3, 10, dtype=torch.long)
    rule = masks.mask_mod(mask_kind, masks.image_slots(one_document, N_IMAGE), keep, one_document)
    dense = masks.create_mask(rule, 3, 1, 10, 10)
    assert torch.equal(dense, masks.attention_mask(mask_kind, N_IMAGE, keep))


@pytest.mark.parametrize("mask_kind", masks.MASK_KINDS)
def test_document_mask_is_each_documents_own_mask_on_the_diagonal(mask_kind):
    document = torch.tensor([[0] * 7 + [1] * 5 + [-1] * 2])  # documents of 7 and 5 tokens, 2 pads
    expected = torch.eye(14, dtype=torch.bool)  # a pad sees only itself
    expected[:7, :7] = masks.attention_mask(mask_kind, N_IMAGE, torch.ones(1, 7, dtype=torch.bool))[0, 0]
    expected[7:12, 7:12] = masks.attention_mask(mask_kind, N_IMAGE, torch.ones(1, 5, dtype=torch.bool))[0, 0]
    assert torch.equal(masks.document_mask(mask_kind, N_IMAGE, document)[0, 0], expected)


def test_block_mask_skips_fully_masked_blocks():
    """Prefix over 4 blocks of 128 tokens: the image block is bidirectional, text causal, so the blocks above
    the diagonal are skipped: 10 of 16 are computed."""
    keep = torch.ones(1, 512, dtype=torch.bool)
    block_mask = masks.block_mask("prefix", 128, keep)
    computed = block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()
    assert computed.item() == 10


def blocks_needed(dense, block=128):
    """Which block x block tiles of a dense [B, 1, S, S] mask allow any entry, and which allow every one."""
    B, _, S, _ = dense.shape
    n = -(-S // block)
    tiles = torch.zeros(B, n * block, n * block, dtype=torch.bool)
    tiles[:, :S, :S] = dense[:, 0]
    tiles = tiles.view(B, n, block, n, block).transpose(2, 3).flatten(3)
    return tiles.any(3), tiles.all(3)


def listed_full_blocks(block_mask):
    B, _, n, _ = block_mask.full_kv_indices.shape
    full = torch.zeros(B, n, n, dtype=torch.bool)
    for b in range(B):
        for q in range(n):
            full[b, q, block_mask.full_kv_indices[b, 0, q, :block_mask.full_kv_num_blocks[b, 0, q].item()]] = True
    return full


def packed_rows(cuts, length=300):
    """Rows of documents cut at the given places (some across 128-token blocks), the rest padding."""
    document = torch.full((len(cuts), length), -1)
    for row, row_cuts in enumerate(cuts):
        for d, (start, end) in enumerate(zip(row_cuts, row_cuts[1:])):
            document[row, start:end] = d
    return document


@pytest.mark.parametrize("fixed", [False, True], ids=["built", "in FixedInputs"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("mask_kind", masks.MASK_KINDS)
def test_block_lists_name_exactly_the_blocks_the_dense_mask_needs(mask_kind, packed, fixed):
    """The compiled kernel computes only the blocks a BlockMask lists, and applies the rule only in those not
    listed as full; eager FlexAttention (the CPU's, in the tests above) reads the rule entry by entry and
    never looks at the lists. So the lists are checked here: a block is listed where the dense mask allows
    something in it, and listed as full only where it allows everything. With FixedInputs the lists of a
    second batch of the same shape land in the first one's memory and must be the second's."""
    n_image = 20
    if packed:
        earlier, document = packed_rows([[0, 90, 250], [0, 40]]), packed_rows([[0, 130, 200, 290], [0, 256]])
        keep, earlier_keep = document >= 0, earlier >= 0
        dense = masks.document_mask(mask_kind, n_image, document)
    else:
        keep, earlier_keep = torch.ones(2, 300, dtype=torch.bool), torch.ones(2, 300, dtype=torch.bool)
        keep[1, 170:], earlier_keep[0, 260:] = False, False
        document = earlier = None
        dense = masks.attention_mask(mask_kind, n_image, keep)
    inputs = model_module.FixedInputs() if fixed else None
    if fixed:
        masks.block_mask(mask_kind, n_image, earlier_keep, earlier, fixed=inputs)
    block_mask = masks.block_mask(mask_kind, n_image, keep, document, fixed=inputs)
    needed, all_allowed = blocks_needed(dense)
    assert torch.equal(block_mask.to_dense()[:, 0].bool(), needed)
    full = listed_full_blocks(block_mask)
    assert torch.equal(full & ~all_allowed, torch.zeros_like(full)) and full.any()


def segments_as_dense(segments, n_tokens):
    """What model.segment_attention computes, as a dense [n_tokens, n_tokens] mask over the rows laid end to end."""
    dense = masks.segment_mask(segments.documents, n_tokens, is_causal=segments.mask_kind != "bidirectional")
    if segments.mask_kind == "prefix":
        dense = torch.where(segments.image[:, None], masks.segment_mask(segments.parts, n_tokens, False), dense)
    return dense


@pytest.mark.parametrize("fixed", [False, True], ids=["built", "in FixedInputs"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("mask_kind", masks.MASK_KINDS)
def test_segments_are_the_dense_mask_for_every_real_token(mask_kind, packed, fixed):
    """attention="varlen" hands the kernel segments of tokens that attend only within themselves
    (masks.Segments). Laid end to end, the rows' segments give every real token the row of the dense mask: its
    own document's, under the stage's rule. Pads see the other pads of their segment (the dense mask lets them
    see only themselves), which reaches no real token. Two batches of one shape, the second with more
    documents, keep one length of boundaries (one CUDA graph), and with FixedInputs the second's lie in the
    first's memory."""
    n_image = 20
    if packed:
        earlier, document = packed_rows([[0, 290], [0, 40]]), packed_rows([[0, 30, 130, 200, 290], [0, 256]])
        keep, earlier_keep = document >= 0, earlier >= 0
        dense = masks.document_mask(mask_kind, n_image, document)
    else:
        keep, earlier_keep = torch.ones(2, 300, dtype=torch.bool), torch.ones(2, 300, dtype=torch.bool)
        keep[1, 170:] = False
        document = earlier = None
        dense = masks.attention_mask(mask_kind, n_image, keep)
    inputs = model_module.FixedInputs() if fixed else None
    first = masks.Segments(mask_kind, n_image, earlier_keep, earlier, fixed=inputs)
    first_memory, first_shape = first.documents.data_ptr(), first.documents.shape
    segments = masks.Segments(mask_kind, n_image, keep, document, fixed=inputs)
    rows, seq_len = keep.shape
    expected = torch.block_diag(*dense[:, 0])  # each row's mask on the diagonal: rows do not see each other
    real = keep.flatten()
    assert torch.equal(segments_as_dense(segments, rows * seq_len)[real], expected[real])
    assert segments.documents.shape == first_shape
    assert (segments.documents.data_ptr() == first_memory) == fixed


def test_segment_boundaries_list_each_segment_then_repeat_the_end():
    labels = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])  # two documents and a pad; one document
    assert masks.segment_boundaries(labels, count=6).tolist() == [0, 3, 5, 6, 12, 12, 12]


def test_more_segments_than_boundaries_is_an_error_not_a_merge():
    """Documents shorter than the image block cannot come from data.pack_documents; were they to come, the
    boundaries would run out and the last documents would see each other. The count is checked on the device
    (no wait for the GPU) and stops with an error."""
    document = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])  # three 2-token documents; image blocks of 4 allow one
    with pytest.raises(RuntimeError, match="more segments than boundaries"):
        masks.Segments("causal", 4, document >= 0, document)


def test_positions_restart_in_every_document():
    document = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1]])
    assert masks.document_positions(document).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert masks.image_slots(document, 2).tolist() == [[True, True, False, True, True, False, False, False]]


# --- FlexAttention against SDPA with the dense mask -----------------------------------------------------

@pytest.mark.parametrize("mask_kind", masks.MASK_KINDS)
def test_flex_attention_matches_sdpa_with_padding(mask_kind, flex_backward_on_cpu):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 20, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 20, 16, requires_grad=True) for _ in range(2))  # GQA: 2 key-value heads
    keep = torch.ones(2, 20, dtype=torch.bool)
    keep[1, 13:] = False
    dense = attend(q, k, v, masks.attention_mask(mask_kind, 6, keep))
    flex = attend(q, k, v, masks.block_mask(mask_kind, 6, keep))
    assert (dense - flex).abs().max() < 1e-5
    target = torch.randn_like(dense)
    dense_grads = torch.autograd.grad((dense * target).sum(), (q, k, v))
    flex_grads = torch.autograd.grad((flex * target).sum(), (q, k, v))
    for d, f in zip(dense_grads, flex_grads):
        assert (d - f).abs().max() < 1e-5


def loss_and_gradients(model, run):
    model.zero_grad()
    loss = run()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_loss_and_gradients(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(loss_a - loss_b) < 1e-5, (loss_a, loss_b)
    for name, grad in grads_a.items():
        assert (grad - grads_b[name]).abs().max() < 1e-4, name


def with_attention(model, attention, run):
    model.attention = attention
    return loss_and_gradients(model, run)


@pytest.mark.parametrize("mask_kind", masks.MASK_KINDS)
def test_model_loss_and_gradients_flex_equals_sdpa(mask_kind, flex_backward_on_cpu):
    model, batch = tiny_vlm(), padded_batch([7, 4, 9])
    run = lambda: model(**batch, mask_kind=mask_kind)
    assert_same_loss_and_gradients(with_attention(model, "sdpa", run), with_attention(model, "flex", run))


def test_prefix_by_blocks_with_flash_kernels_equals_the_dense_mask():
    """attention="flash" runs the prefix mask of right-padded rows as two mask-free (or bottom-right causal)
    attention calls; loss and gradients equal the dense-mask reference, padding included."""
    model, batch = tiny_vlm(), padded_batch([7, 4, 9])
    run = lambda: model(**batch, mask_kind="prefix")
    assert_same_loss_and_gradients(with_attention(model, "sdpa", run), with_attention(model, "flash", run))
    assert isinstance(model.mask("prefix", model.keep(batch["text_mask"])), masks.PrefixBlocks)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("mask_kind", masks.MASK_KINDS)
def test_segments_give_the_dense_masks_loss_and_gradients(mask_kind, packed):
    """attention="varlen": the rows laid end to end, attention within segments of tokens (on the CPU the
    segments as a dense mask: the kernel itself is checked on a GPU, test_gpu_paths.py). The prefix mask of
    padded rows goes by blocks, as under "flash"."""
    model = tiny_vlm()
    if packed:
        batch = data.pack_documents(samples_of(padded_batch([7, 4, 9, 3, 5])), max_len=16, n_image_tokens=N_IMAGE)
        run = lambda: model.forward_packed(**batch, mask_kind=mask_kind)
    else:
        batch = padded_batch([7, 4, 9])
        run = lambda: model(**batch, mask_kind=mask_kind)
    assert_same_loss_and_gradients(with_attention(model, "sdpa", run), with_attention(model, "varlen", run))


def test_packed_loss_and_gradients_flex_equals_sdpa(flex_backward_on_cpu):
    model = tiny_vlm()
    packed = data.pack_documents(samples_of(padded_batch([7, 4, 9, 3, 5])), max_len=16, n_image_tokens=N_IMAGE)
    run = lambda: model.forward_packed(**packed)
    assert_same_loss_and_gradients(with_attention(model, "sdpa", run), with_attention(model, "flex", run))


def test_gradient_checkpointing_recomputes_the_blocks_and_changes_no_result(monkeypatch):
    model, batch = tiny_vlm(), padded_batch([7, 4, 9])
    run = lambda: model(**batch, mask_kind="prefix")
    plain = loss_and_gradients(model, run)
    calls = []
    checkpoint = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *args, **kwargs: calls.append(1) or checkpoint(*args, **kwargs))
    model.vision.gradient_checkpointing = model.language.gradient_checkpointing = True
    assert_same_loss_and_gradients(plain, loss_and_gradients(model, run))
    assert len(calls) == 4  # each of the 2 vision and 2 language blocks ran under checkpoint


# --- the chunked loss -------------------------------------------------------------------------------------

def test_one_matmul_over_stacked_weights_equals_the_separate_layers():
    """q, k and v (and SwiGLU's gate and up) come out of one matmul over their stacked weights; values and
    each layer's own gradients are those of the three separate layers."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, width) for width in (16, 4, 4)]  # Qwen2's shapes in small: k, v narrower than q
    x = torch.randn(3, 5, 16)
    fused = model_module.shared_input_linear(x, *layers)
    separate = [layer(x) for layer in layers]
    for a, b in zip(fused, separate):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
    weights = torch.randn(3, 5, 24)
    grads = torch.autograd.grad((torch.cat(fused, -1) * weights).sum(), [p for layer in layers for p in layer.parameters()])
    expected = torch.autograd.grad((torch.cat(separate, -1) * weights).sum(), [p for layer in layers for p in layer.parameters()])
    for a, b in zip(grads, expected):
        assert torch.allclose(a, b, atol=1e-5)


def test_chunked_loss_equals_full_logits_cross_entropy():
    """The chunked loss computes its gradients in the forward pass (LinearCrossEntropy); autograd's, through
    the full logits, must be the same, scaled like them by whatever multiplies the loss (the micro-batch's
    share in train.py)."""
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, 16, requires_grad=True)
    rows = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (23,))
    chunked = next_token_loss(weight, rows, targets, chunk_size=5)  # 5 chunks, the last one short
    plain = F.cross_entropy(rows @ weight.T, targets)
    assert abs(chunked.item() - plain.item()) < 1e-5
    for a, b in zip(torch.autograd.grad(0.3 * chunked, (weight, rows)), torch.autograd.grad(0.3 * plain, (weight, rows))):
        assert (a - b).abs().max() < 1e-6
    with torch.no_grad():  # evaluation computes no gradients, and the same loss
        assert abs(next_token_loss(weight, rows, targets, chunk_size=5).item() - plain.item()) < 1e-5


def test_chunked_loss_ignored_targets_and_frozen_output_layer():
    """An IGNORE_INDEX target adds nothing (but counts in the mean); a frozen output layer (stages 0-1) gets no
    gradient, while the rows still do."""
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, 16)
    rows = torch.randn(9, 16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (9,))
    targets[[2, 7]] = IGNORE_INDEX
    chunked = next_token_loss(weight, rows, targets, chunk_size=4)
    plain = F.cross_entropy(rows @ weight.T, targets, ignore_index=IGNORE_INDEX, reduction="sum") / 9
    assert abs(chunked.item() - plain.item()) < 1e-5
    (grad,), (expected,) = torch.autograd.grad(chunked, (rows,)), torch.autograd.grad(plain, (rows,))
    assert (grad - expected).abs().max() < 1e-6 and grad[[2, 7]].abs().max() == 0


def test_chunked_loss_under_bf16_autocast():
    """As in training: bf16 matmuls, the softmax in fp32, gradients in the parameters' own dtypes."""
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, 16, requires_grad=True)
    rows = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (23,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = next_token_loss(weight, rows, targets, chunk_size=5)
        plain = F.cross_entropy((rows @ weight.T).float(), targets)
    assert abs(chunked.item() - plain.item()) < 1e-3
    for a, b in zip(torch.autograd.grad(chunked, (weight, rows)), torch.autograd.grad(plain, (weight, rows))):
        assert a.dtype == torch.float32 and (a - b).abs().max() < 1e-2 * b.abs().max()


def test_compiled_softmax_cross_entropy_equals_eager():
    """The GPU runs the loss's softmax compiled (fused_softmax_cross_entropy), for any number of rows; compiled
    here on the CPU, it must give the eager values: the loss, and softmax - one-hot, zero on ignored rows."""
    pytest.importorskip("torch._inductor")
    torch.manual_seed(0)
    logits = torch.randn(23, VOCAB).bfloat16()
    targets = torch.randint(0, VOCAB, (23,))
    targets[3] = IGNORE_INDEX
    for n in (23, 7):  # a full chunk and a short last one, one compiled graph
        loss, grad = model_module.fused_softmax_cross_entropy(logits[:n], targets[:n])
        eager_loss, eager_grad = model_module.softmax_cross_entropy(logits[:n], targets[:n])
        assert abs(loss.item() - eager_loss.item()) < 1e-4 and grad.dtype == torch.bfloat16
        assert (grad.float() - eager_grad.float()).abs().max() < 1e-2 and grad[3].abs().max() == 0
        expected = F.cross_entropy(logits[:n].float(), targets[:n], ignore_index=IGNORE_INDEX, reduction="sum")
        assert abs(eager_loss.item() - expected.item()) < 1e-4


def test_model_loss_equals_full_logits_with_shifted_labels():
    """The definition (eq. 1): logits at every position, the last image token predicting the first text token."""
    model = tiny_vlm()
    batch = padded_batch([7, 4, 9])
    loss = model(**batch)
    image_tokens = model.projector(model.vision(batch["pixel_values"]))
    logits = model.language.lm_head(model.decode(image_tokens, batch["input_ids"], batch["text_mask"], "prefix"))
    predictions = logits[:, N_IMAGE - 1:-1]
    plain = F.cross_entropy(predictions.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
    assert abs(loss.item() - plain.item()) < 1e-5
    params = [p for p in model.parameters()]
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(plain, params)):
        assert (a - b).abs().max() < 1e-5


def test_a_batch_without_a_text_mask_is_one_without_padding():
    model = tiny_vlm()
    batch = padded_batch([6, 6])
    assert batch["text_mask"].all()
    without = {key: value for key, value in batch.items() if key != "text_mask"}
    assert torch.equal(model(**without), model(**batch))


def test_only_labelled_positions_reach_the_output_layer(monkeypatch):
    """The prompt and the padding carry no label, so their logits are never computed; data's batches bring the
    labelled positions counted on the host, and the loss is the same as when the model finds them itself."""
    model, batch = tiny_vlm(), padded_batch([7, 4, 9])
    seen = []
    real = model_module.next_token_loss
    monkeypatch.setattr(model_module, "next_token_loss", lambda weight, rows, targets: seen.append(len(rows)) or real(weight, rows, targets))
    collated = data.collate(samples_of(batch), pad_id=0)
    n_labels = int((batch["labels"] != IGNORE_INDEX).sum())
    assert collated["label_positions"].tolist() == (batch["labels"].flatten() != IGNORE_INDEX).nonzero().flatten().tolist()
    with torch.no_grad():
        assert abs(model(**collated).item() - model(**batch).item()) < 1e-6
    assert seen == [n_labels, n_labels] and n_labels == (7 - 2) + (4 - 2) + (9 - 2)
    with pytest.raises(ValueError, match="no token of the batch carries a label"):
        model(**dict(batch, labels=torch.full_like(batch["labels"], IGNORE_INDEX)))


# --- packing ----------------------------------------------------------------------------------------------

def test_pack_documents_layout():
    samples = [{"pixel_values": torch.full((3, 28, 28), float(i)), "input_ids": torch.arange(n) + 10 * i,
                "labels": torch.arange(n) + 10 * i} for i, n in enumerate([6, 2, 3, 9])]
    batch = data.pack_documents(samples, max_len=14, n_image_tokens=N_IMAGE, pad_id=0)
    # documents of 10, 6, 7 and 13 tokens (4 image + text) in rows of 14: #3 (13) and #0 (10) leave no room
    # for any other, so each has a row; #2 (7) opens the third and #1 (6) joins it. The rows are as long as
    # the fullest (13), not max_len
    assert batch["document"].tolist() == [[0] * 13, [0] * 10 + [-1] * 3, [0] * 7 + [1] * 6]
    assert batch["input_ids"][2].tolist() == [0] * 4 + [20, 21, 22] + [0] * 4 + [10, 11]
    assert batch["labels"][2].tolist() == [-100] * 4 + [20, 21, 22] + [-100] * 4 + [10, 11]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [3, 0, 2, 1]  # one image per document, in row order
    rounded = data.pack_documents(samples, max_len=14, n_image_tokens=N_IMAGE, pad_to_multiple=4)
    assert rounded["document"].shape == (3, 14)  # 13 rounded up to 16, cut to max_len
    wider = data.pack_documents(samples, max_len=32, n_image_tokens=N_IMAGE, pad_to_multiple=4)
    assert wider["document"].shape == (2, 32)  # rows of 13 + 10 + 7 and of 6 tokens: 30, rounded up to 32
    some_rows = data.pack_documents(samples, max_len=14, n_image_tokens=N_IMAGE, rows=[[2, 1]])
    assert some_rows["pixel_values"][:, 0, 0, 0].tolist() == [2, 1] and some_rows["document"].shape == (1, 13)
    with pytest.raises(ValueError, match="max_len"):
        data.pack_documents(samples, max_len=12, n_image_tokens=N_IMAGE)


def test_fill_rows_leaves_less_room_than_first_fit():
    """Rows of 10 for documents of 5, 4, 3, 3, 3, 2 tokens: first-fit, longest first, puts 5 + 4 in the first
    row and then needs three rows; trying each second document finds 5 + 3 + 2 and 4 + 3 + 3, two full rows."""
    rows = data.fill_rows([5, 4, 3, 3, 3, 2], max_len=10)
    assert rows == [[0, 2, 5], [1, 3, 4]]


def test_fill_rows_places_every_document_once_within_the_rows():
    lengths = [random.Random(seed).randint(1, 50) for seed in range(300)]
    rows = data.fill_rows(lengths, max_len=64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) <= math.ceil(sum(lengths) / 64) + 2  # close to the bound no packing can beat


def test_pack_micro_batches_cuts_the_rows_into_micro_batches():
    samples = [{"pixel_values": torch.zeros(3, 28, 28), "input_ids": torch.arange(n), "labels": torch.arange(n)}
               for n in [6, 2, 3, 9, 1, 5, 4]]
    micro_batches = data.pack_micro_batches(samples, max_len=14, n_image_tokens=N_IMAGE, pack_rows=2)
    assert [len(b["input_ids"]) for b in micro_batches[:-1]] == [2] * (len(micro_batches) - 1)
    assert sum(len(b["pixel_values"]) for b in micro_batches) == len(samples)  # every sample, once
    assert sum(int((b["document"] >= 0).sum()) for b in micro_batches) == sum(N_IMAGE + n for n in [6, 2, 3, 9, 1, 5, 4])


def test_packed_rows_give_each_sample_the_loss_it_has_alone():
    """Packing changes no sample's loss: with only sample i's labels kept, the packed loss is sample i's own."""
    model = tiny_vlm()
    batch = padded_batch([7, 4, 9, 3, 5], seed=1)
    samples = samples_of(batch)
    packed = data.pack_documents(samples, max_len=16, n_image_tokens=N_IMAGE)
    assert packed["document"].max() >= 1  # some row really holds two documents
    with torch.no_grad():
        for i, sample in enumerate(samples):
            alone = model(sample["pixel_values"][None], sample["input_ids"][None], sample["labels"][None],
                          torch.ones(1, len(sample["input_ids"]), dtype=torch.bool))
            others_unlabelled = [dict(s, labels=s["labels"] if j == i else torch.full_like(s["labels"], IGNORE_INDEX))
                                 for j, s in enumerate(samples)]
            only_i = data.pack_documents(others_unlabelled, max_len=16, n_image_tokens=N_IMAGE)
            assert abs(model.forward_packed(**only_i).item() - alone.item()) < 1e-5, i
        # and all of them at once: the mean over every label, as for the padded batch
        assert abs(model.forward_packed(**packed).item() - model(**batch).item()) < 1e-5


# --- compiled blocks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["flex", "sdpa", "varlen"])
def test_fixed_inputs_reuse_memory_and_keep_each_batchs_values(attention, flex_backward_on_cpu):
    """With CUDA graphs (compile_blocks in a graph mode), the masks and RoPE tables built for each batch go
    through model.FixedInputs, so that batches of one shape hand the blocks the same memory. Two packed batches
    of one shape, their documents cut in different places: each keeps its own loss and gradients, and the
    second's mask lies where the first's did."""
    model = tiny_vlm()
    first = data.pack_documents(samples_of(padded_batch([7, 4, 9, 3, 5])), 16, N_IMAGE, rows=[[1, 3], [4]],
                                pad_to_multiple=16)   # rows of 8 + 7 and 9 tokens
    second = data.pack_documents(samples_of(padded_batch([2, 5, 6], seed=1)), 16, N_IMAGE, rows=[[0, 1], [2]],
                                 pad_to_multiple=16)  # rows of 6 + 9 and 10 tokens
    assert first["document"].shape == second["document"].shape
    assert not torch.equal(first["document"], second["document"])
    expected = [with_attention(model, attention, lambda: model.forward_packed(**b)) for b in (first, second)]
    model.use_fixed_inputs()  # as compile_blocks does in a CUDA-graph mode
    for batch, reference in zip((first, second), expected):
        assert_same_loss_and_gradients(with_attention(model, attention, lambda: model.forward_packed(**batch)), reference)
    masks_built = [model.mask("prefix", b["document"] >= 0, b["document"]) for b in (first, second)]
    held = {"sdpa": lambda m: m, "flex": lambda m: m.kv_indices, "varlen": lambda m: m.documents}[attention]
    memory = [held(m).data_ptr() for m in masks_built]
    assert memory[0] == memory[1]



@pytest.mark.parametrize("attention", model_module.ATTENTION_PATHS)
def test_every_attention_path_compiles_a_block_whole(attention):
    """A graph break inside a compiled block silently cuts it into pieces with eager code between them, which
    loses the fusion and adds launches. Each attention path (its mask built outside the blocks, as VLM.mask
    does) must trace a language block into one graph; so must a vision block."""
    model, batch = tiny_vlm(), padded_batch([7, 4, 9])
    model.attention = attention
    keep = model.keep(batch["text_mask"])
    config = model.config.language
    cos, sin = model_module.rope_tables(model_module.positions(keep), config.hidden_size // config.num_attention_heads,
                                        config.rope_theta)
    hidden = torch.randn(*keep.shape, config.hidden_size)
    with torch.no_grad():  # FlexAttention's backward is GPU-only; tracing the forward shows the breaks
        language = torch._dynamo.explain(model.language.layers[0])(hidden, cos, sin, model.mask("prefix", keep))
        vision = torch._dynamo.explain(model.vision.layers[0])(torch.randn(3, N_IMAGE, 32))
    assert language.graph_break_count == 0, [b.reason for b in language.break_reasons]
    assert vision.graph_break_count == 0, [b.reason for b in vision.break_reasons]


def test_compiled_blocks_give_the_same_loss_and_gradients():
    """torch.compile on the CPU builds C++ kernels: about 15 s on two cores for the two block types."""
    pytest.importorskip("torch._inductor")
    model = tiny_vlm()
    batches = [padded_batch([7, 4, 9]), padded_batch([5, 3], seed=1)]  # another number of images, as packing gives
    eager = [loss_and_gradients(model, lambda: model(**batch)) for batch in batches]
    model.compile_blocks()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = [loss_and_gradients(model, lambda: model(**batch)) for batch in batches]
    for a, b in zip(eager, compiled):
        assert_same_loss_and_gradients(a, b)
    # compiled indeed: a graph per block type and batch shape (the vision blocks' second one for any number of
    # images), each block whole (graph_break would count the breaks)
    assert counters["stats"]["unique_graphs"] >= 3 and not counters["graph_break"], dict(counters)

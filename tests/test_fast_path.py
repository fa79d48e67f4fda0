"""The fast path (fast_path.py) computes what the reference computes (model.py: SDPA with the dense mask,
cross-entropy over the full logits): its masks entry by entry and block by block, its attention, its chunked
loss, and whole training steps, forward and gradients, for every mask, padded and packed, with compiled blocks.
Small random models on the CPU; tests/test_gpu_paths.py runs the GPU's kernels."""
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

import data
import fast_path
import masks
import model as model_module
from model import IGNORE_INDEX, VLM, Qwen2Config, SigLIPConfig, VLMConfig, attend

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


def samples(lengths, seed=0):
    """data.make_sample's samples: random texts of these lengths, the first two tokens a prompt without loss."""
    generator = torch.Generator().manual_seed(seed)
    made = []
    for n in lengths:
        input_ids = torch.randint(0, VOCAB, (n,), generator=generator)
        labels = input_ids.clone()
        labels[:2] = IGNORE_INDEX
        made.append({"pixel_values": torch.randn(3, 28, 28, generator=generator), "input_ids": input_ids,
                     "labels": labels})
    return made


def padded_batch(lengths, seed=0, pad_to_multiple=1):
    """One document per row, right-padded (data.collate)."""
    return data.collate(samples(lengths, seed), N_IMAGE, pad_id=0, pad_to_multiple=pad_to_multiple)


def packed_batch(lengths, seed=0, max_len=16, **options):
    """Several documents per row (data.pack_documents)."""
    return data.pack_documents(samples(lengths, seed), max_len, N_IMAGE, **options)


def on_fast_path(model, fast):
    model.fast_path = fast_path.FastPath() if fast else None
    return model


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    """torch refuses FlexAttention's backward on the CPU with a front-end check (its fast kernels are GPU
    kernels); the eager reference implementation that runs here differentiates fine. Lift the check, so the
    gradients can be compared here; tests/test_gpu_paths.py runs the compiled kernels on a GPU."""
    import torch.nn.attention.flex_attention as flex_attention
    monkeypatch.setattr(flex_attention, "_validate_device", lambda *tensors: None)


# --- the masks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_kind", masks.MASK_KINDS)
def test_mask_mod_is_the_dense_mask_entry_by_entry(mask_kind):
    document = torch.tensor([[0] * 10, [0] * 7 + [-1] * 3, [0] * 5 + [1] * 4 + [-1]])  # full, padded, packed
    labelled = torch.tensor([[0] * 7 + [1] * 3, [0] * 5 + [1, 1, 0, 0, 0], [0] * 8 + [1, 0]]).bool()  # the answers
    rule = fast_path.mask_mod(mask_kind, masks.prefix_block(mask_kind, N_IMAGE, document, labelled), document)
    assert torch.equal(create_mask(rule, 3, 1, 10, 10), masks.attention_mask(mask_kind, N_IMAGE, document, labelled))


def test_block_mask_skips_fully_masked_blocks():
    """Prefix over 4 blocks of 128 tokens: the image block is bidirectional, text causal, so the blocks above
    the diagonal are skipped: 10 of 16 are computed."""
    block_mask = fast_path.block_mask("prefix", 128, torch.zeros(1, 512, dtype=torch.long))
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
    else:
        earlier, document = packed_rows([[0, 260], [0, 300]]), packed_rows([[0, 300], [0, 170]])
    labelled = torch.arange(300) % 7 == 0  # a label every 7 tokens: each document's prompt ends somewhere
    labelled = labelled.expand_as(document) & ~masks.image_slots(document, n_image)
    dense = masks.attention_mask(mask_kind, n_image, document, labelled)
    inputs = fast_path.FixedInputs() if fixed else None
    if fixed:
        fast_path.block_mask(mask_kind, n_image, earlier, fixed=inputs)
    block_mask = fast_path.block_mask(mask_kind, n_image, document, labelled, fixed=inputs)
    needed, all_allowed = blocks_needed(dense)
    assert torch.equal(block_mask.to_dense()[:, 0].bool(), needed)
    full = listed_full_blocks(block_mask)
    assert torch.equal(full & ~all_allowed, torch.zeros_like(full)) and full.any()


# --- attention and whole steps against the reference --------------------------------------------------

@pytest.mark.parametrize("mask_kind", masks.MASK_KINDS)
def test_flex_attention_matches_sdpa_with_padding(mask_kind, flex_backward_on_cpu):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 20, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 20, 16, requires_grad=True) for _ in range(2))  # GQA: 2 key-value heads
    document = torch.zeros(2, 20, dtype=torch.long)
    document[1, 13:] = -1
    labelled = torch.zeros(2, 20, dtype=torch.bool)
    labelled[:, 9:] = True  # a prompt of 3 tokens after the 6 image tokens, then the answer
    dense = attend(q, k, v, masks.attention_mask(mask_kind, 6, document, labelled))
    flex = attend(q, k, v, fast_path.FlexMask(fast_path.block_mask(mask_kind, 6, document, labelled)))
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
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_gradients(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(loss_a - loss_b) < 1e-5, (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        assert (grad - grads_b[name]).abs().max() < 1e-4, name


def reference_and_fast(model, run):
    return [loss_and_gradients(on_fast_path(model, fast), run) for fast in (False, True)]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("mask_kind", masks.MASK_KINDS)
def test_fast_path_gives_the_references_loss_and_gradients(mask_kind, packed, flex_backward_on_cpu):
    """A training step on the fast path, padded rows (the prefix mask by blocks, the others by FlexAttention)
    and packed ones (FlexAttention), equals the reference step: SDPA with the dense mask, full logits."""
    model = tiny_vlm()
    batch = packed_batch([7, 4, 9, 3, 5]) if packed else padded_batch([7, 4, 9])
    assert packed == (len(batch["pixel_values"]) > len(batch["input_ids"]))
    reference, fast = reference_and_fast(model, lambda: model(**batch, mask_kind=mask_kind))
    assert_same_loss_and_gradients(reference, fast)


def test_the_prefix_mask_of_padded_rows_goes_by_blocks_and_packed_rows_by_flex():
    path, rope = fast_path.FastPath(), (torch.zeros(1), torch.zeros(1))
    document = torch.zeros(2, 12, dtype=torch.long)
    assert isinstance(path.inputs("prefix", N_IMAGE, document, rope, packed=False)[0], fast_path.PrefixBlocks)
    assert isinstance(path.inputs("prefix", N_IMAGE, document, rope, packed=True)[0], fast_path.FlexMask)
    assert isinstance(path.inputs("causal", N_IMAGE, document, rope, packed=False)[0], fast_path.FlexMask)
    with pytest.raises(ValueError, match="unknown mask_kind"):
        path.inputs("prefix_typo", N_IMAGE, document, rope, packed=False)


def test_gradient_checkpointing_recomputes_the_blocks_and_changes_no_result(monkeypatch):
    model, batch = tiny_vlm(), padded_batch([7, 4, 9])
    run = lambda: model(**batch, mask_kind="prefix")
    plain = loss_and_gradients(model, run)
    calls = []
    checkpoint = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *args, **kwargs: calls.append(1) or checkpoint(*args, **kwargs))
    model.vision.gradient_checkpointing = model.language.gradient_checkpointing = True
    assert_same_loss_and_gradients(plain, loss_and_gradients(model, run))
    assert len(calls) == 3  # each vision block that runs (1 of 2: feature layer -2) and 2 language blocks


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
    chunked = fast_path.next_token_loss(weight, rows, targets, chunk_size=5)  # 5 chunks, the last one short
    plain = F.cross_entropy(rows @ weight.T, targets)
    assert abs(chunked.item() - plain.item()) < 1e-5
    for a, b in zip(torch.autograd.grad(0.3 * chunked, (weight, rows)), torch.autograd.grad(0.3 * plain, (weight, rows))):
        assert (a - b).abs().max() < 1e-6
    with torch.no_grad():  # evaluation computes no gradients, and the same loss
        assert abs(fast_path.next_token_loss(weight, rows, targets, chunk_size=5).item() - plain.item()) < 1e-5


def test_chunked_loss_ignored_targets_and_frozen_output_layer():
    """An IGNORE_INDEX target adds nothing (but counts in the mean); a frozen output layer (stages 0-1) gets no
    gradient, while the rows still do."""
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, 16)
    rows = torch.randn(9, 16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (9,))
    targets[[2, 7]] = IGNORE_INDEX
    chunked = fast_path.next_token_loss(weight, rows, targets, chunk_size=4)
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
        chunked = fast_path.next_token_loss(weight, rows, targets, chunk_size=5)
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
        loss, grad = fast_path.fused_softmax_cross_entropy(logits[:n], targets[:n])
        eager_loss, eager_grad = fast_path.softmax_cross_entropy(logits[:n], targets[:n])
        assert abs(loss.item() - eager_loss.item()) < 1e-4 and grad.dtype == torch.bfloat16
        assert (grad.float() - eager_grad.float()).abs().max() < 1e-2 and grad[3].abs().max() == 0
        expected = F.cross_entropy(logits[:n].float(), targets[:n], ignore_index=IGNORE_INDEX, reduction="sum")
        assert abs(eager_loss.item() - expected.item()) < 1e-4


def test_reference_loss_is_each_documents_next_token_loss():
    """Eq. 1 by hand for one document: the hidden state before each labelled token, through the output layer,
    scored against that token; the batch's loss is the mean over every label of every row."""
    model, batch = tiny_vlm(), padded_batch([7, 4, 9])
    with torch.no_grad():
        hidden = model.hidden_states(model.image_tokens(batch["pixel_values"]), batch["input_ids"],
                                     batch["document"], "prefix")
        logits = model.language.lm_head(hidden)
        terms = [F.cross_entropy(logits[r, t - 1], batch["labels"][r, t], reduction="sum")
                 for r, t in (batch["labels"] != IGNORE_INDEX).nonzero().tolist()]
        assert len(terms) == (7 - 2) + (4 - 2) + (9 - 2)
        assert abs(model(**batch).item() - (sum(terms) / len(terms)).item()) < 1e-5


def test_only_labelled_positions_reach_the_output_layer(monkeypatch):
    """On the fast path the prompt, the image and the padding carry no label, so their logits are never
    computed; data's batches bring the labelled positions counted on the host, and the loss is the same when
    the model finds them itself."""
    model, batch = on_fast_path(tiny_vlm(), True), padded_batch([7, 4, 9])
    seen = []
    real = fast_path.next_token_loss
    monkeypatch.setattr(fast_path, "next_token_loss", lambda weight, rows, targets: seen.append(len(rows)) or real(weight, rows, targets))
    n_labels = int((batch["labels"] != IGNORE_INDEX).sum())
    assert batch["label_positions"].tolist() == (batch["labels"].flatten() != IGNORE_INDEX).nonzero().flatten().tolist()
    without = {key: value for key, value in batch.items() if key != "label_positions"}
    with torch.no_grad():
        assert abs(model(**batch).item() - model(**without).item()) < 1e-6
    assert seen == [n_labels, n_labels] and n_labels == (7 - 2) + (4 - 2) + (9 - 2)
    with pytest.raises(ValueError, match="no token of the batch carries a label"):
        model(**dict(without, labels=torch.full_like(batch["labels"], IGNORE_INDEX)))


# --- packing ----------------------------------------------------------------------------------------------

def test_pack_documents_layout():
    made = [{"pixel_values": torch.full((3, 28, 28), float(i)), "input_ids": torch.arange(n) + 10 * i,
             "labels": torch.arange(n) + 10 * i} for i, n in enumerate([6, 2, 3, 9])]
    batch = data.pack_documents(made, max_len=14, n_image_tokens=N_IMAGE, pad_id=0)
    # documents of 10, 6, 7 and 13 tokens (4 image + text) in rows of 14: #3 (13) and #0 (10) leave no room
    # for any other, so each has a row; #2 (7) opens the third and #1 (6) joins it. The rows are as long as
    # the fullest (13), not max_len
    assert batch["document"].tolist() == [[0] * 13, [0] * 10 + [-1] * 3, [0] * 7 + [1] * 6]
    assert batch["input_ids"][2].tolist() == [0] * 4 + [20, 21, 22] + [0] * 4 + [10, 11]
    assert batch["labels"][2].tolist() == [-100] * 4 + [20, 21, 22] + [-100] * 4 + [10, 11]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [3, 0, 2, 1]  # one image per document, in row order
    rounded = data.pack_documents(made, max_len=14, n_image_tokens=N_IMAGE, pad_to_multiple=4)
    assert rounded["document"].shape == (3, 14)  # 13 rounded up to 16, cut to max_len
    wider = data.pack_documents(made, max_len=32, n_image_tokens=N_IMAGE, pad_to_multiple=4)
    assert wider["document"].shape == (2, 32)  # rows of 13 + 10 + 7 and of 6 tokens: 30, rounded up to 32
    some_rows = data.pack_documents(made, max_len=14, n_image_tokens=N_IMAGE, rows=[[2, 1]])
    assert some_rows["pixel_values"][:, 0, 0, 0].tolist() == [2, 1] and some_rows["document"].shape == (1, 13)
    with pytest.raises(ValueError, match="max_len"):
        data.pack_documents(made, max_len=12, n_image_tokens=N_IMAGE)


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
    made = [{"pixel_values": torch.zeros(3, 28, 28), "input_ids": torch.arange(n), "labels": torch.arange(n)}
            for n in [6, 2, 3, 9, 1, 5, 4]]
    micro_batches = data.pack_micro_batches(made, max_len=14, n_image_tokens=N_IMAGE, pack_rows=2)
    assert [len(b["input_ids"]) for b in micro_batches[:-1]] == [2] * (len(micro_batches) - 1)
    assert sum(len(b["pixel_values"]) for b in micro_batches) == len(made)  # every sample, once
    assert sum(int((b["document"] >= 0).sum()) for b in micro_batches) == sum(N_IMAGE + n for n in [6, 2, 3, 9, 1, 5, 4])


def test_collate_is_one_document_per_row():
    batch = padded_batch([3, 5])
    assert batch["document"].tolist() == [[0] * 7 + [-1] * 2, [0] * 9]
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 9) and batch["pixel_values"].shape[0] == 2
    assert (batch["labels"][:, :N_IMAGE] == IGNORE_INDEX).all()  # image slots carry no label
    assert data.collate(samples([3, 5]), N_IMAGE, 0, pad_to_multiple=4)["document"].shape == (2, 12)


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast path"])
def test_packed_rows_give_each_sample_the_loss_it_has_alone(fast, flex_backward_on_cpu):
    """Packing changes no sample's loss: with only sample i's labels kept, the packed loss is sample i's own."""
    model = on_fast_path(tiny_vlm(), fast)
    made = samples([7, 4, 9, 3, 5], seed=1)
    packed = data.pack_documents(made, 16, N_IMAGE)
    assert packed["document"].max() >= 1  # some row really holds two documents
    with torch.no_grad():
        for i, sample in enumerate(made):
            alone = model(**data.collate([sample], N_IMAGE, pad_id=0))
            others_unlabelled = [dict(s, labels=s["labels"] if j == i else torch.full_like(s["labels"], IGNORE_INDEX))
                                 for j, s in enumerate(made)]
            only_i = data.pack_documents(others_unlabelled, 16, N_IMAGE)
            assert abs(model(**only_i).item() - alone.item()) < 1e-5, i
        # and all of them at once: the mean over every label, as for the padded batch
        assert abs(model(**packed).item() - model(**data.collate(made, N_IMAGE, 0)).item()) < 1e-5


# --- compiled blocks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_kind", masks.MASK_KINDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_fixed_inputs_reuse_memory_and_keep_each_batchs_values(packed, mask_kind, flex_backward_on_cpu):
    """With CUDA graphs (compile_blocks in a graph mode), the masks and RoPE tables built for each batch go
    through FixedInputs, so that batches of one shape hand the blocks the same memory. Two batches of one
    shape, their documents cut in different places: each keeps its own loss and gradients, and the second's
    tables and mask lie where the first's did."""
    model = tiny_vlm()
    if packed:
        first = packed_batch([7, 4, 9, 3, 5], rows=[[1, 3], [4]], pad_to_multiple=16)  # rows of 8 + 7 and 9 tokens
        second = packed_batch([2, 5, 6], seed=1, rows=[[0, 1], [2]], pad_to_multiple=16)  # rows of 6 + 9 and 10 tokens
        assert not torch.equal(first["document"], second["document"])
    else:
        first, second = padded_batch([7, 4, 9], pad_to_multiple=16), padded_batch([2, 5, 6], seed=1, pad_to_multiple=16)
    assert first["document"].shape == second["document"].shape
    run = lambda batch: lambda: model(**batch, mask_kind=mask_kind)
    expected = [reference_and_fast(model, run(batch))[0] for batch in (first, second)]
    model.fast_path.fixed = fast_path.FixedInputs()  # as compile_blocks does in a CUDA-graph mode
    for batch, reference in zip((first, second), expected):
        assert_same_loss_and_gradients(loss_and_gradients(model, run(batch)), reference)
    rope = model.language.rope(masks.document_positions(first["document"]))
    built = [model.fast_path.inputs(mask_kind, N_IMAGE, b["document"], rope, packed, b["labels"] != IGNORE_INDEX)
             for b in (first, second)]
    assert built[0][1][0].data_ptr() == built[1][1][0].data_ptr()  # RoPE's cos
    if isinstance(built[0][0], fast_path.FlexMask):  # the block lists (PrefixBlocks holds no tensor)
        assert built[0][0].block_mask.kv_indices.data_ptr() == built[1][0].block_mask.kv_indices.data_ptr()


@pytest.mark.parametrize("mask_kind", masks.MASK_KINDS)
@pytest.mark.parametrize("fast", [False, True], ids=["dense mask", "fast path"])
def test_every_attention_path_compiles_a_block_whole(fast, mask_kind):
    """A graph break inside a compiled block silently cuts it into pieces with eager code between them, which
    loses the fusion and adds launches. Each mask form (built outside the blocks, as VLM.hidden_states does)
    must trace a language block into one graph; so must a vision block."""
    model, batch = on_fast_path(tiny_vlm(), fast), padded_batch([7, 4, 9])
    document = batch["document"]
    rope = model.language.rope(masks.document_positions(document))
    if fast:
        mask, rope = model.fast_path.inputs(mask_kind, N_IMAGE, document, rope, packed=False)
    else:
        mask = masks.attention_mask(mask_kind, N_IMAGE, document)
    hidden = torch.randn(*document.shape, model.config.language.hidden_size)
    with torch.no_grad():  # FlexAttention's backward is GPU-only; tracing the forward shows the breaks
        language = torch._dynamo.explain(model.language.layers[0])(hidden, *rope, mask)
        vision = torch._dynamo.explain(model.vision.layers[0])(torch.randn(3, N_IMAGE, 32))
    assert language.graph_break_count == 0, [b.reason for b in language.break_reasons]
    assert vision.graph_break_count == 0, [b.reason for b in vision.break_reasons]


def test_compiled_blocks_give_the_same_loss_and_gradients():
    """torch.compile on the CPU builds C++ kernels: about 15 s on two cores for the two block types."""
    pytest.importorskip("torch._inductor")
    model = on_fast_path(tiny_vlm(), True)
    batches = [padded_batch([7, 4, 9]), padded_batch([5, 3], seed=1)]  # another number of images, as packing gives
    eager = [loss_and_gradients(model, lambda: model(**batch)) for batch in batches]
    fast_path.compile_blocks(model)
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = [loss_and_gradients(model, lambda: model(**batch)) for batch in batches]
    for a, b in zip(eager, compiled):
        assert_same_loss_and_gradients(a, b)
    # compiled indeed: a graph per block type and batch shape (the vision blocks' second one for any number of
    # images), each block whole (graph_break would count the breaks)
    assert counters["stats"]["unique_graphs"] >= 3 and not counters["graph_break"], dict(counters)


def test_cuda_graph_modes_need_the_fast_paths_fixed_inputs():
    with pytest.raises(ValueError, match="use_fast_path"):
        fast_path.compile_blocks(tiny_vlm(), "reduce-overhead")


def test_a_batch_the_fast_path_would_misread_stops_it():
    """PrefixBlocks is chosen for rows of one right-padded document each (as many images as rows), and the fast
    loss reads the token before each label: a hand-made batch that breaks either (an empty row beside a row of
    two documents; a label at a row's start) is an error, not a silently different loss."""
    model = on_fast_path(tiny_vlm(), True)
    batch = packed_batch([7, 4], max_len=32, rows=[[0, 1]])  # one row of two documents: two images, one row
    empty_row = torch.full_like(batch["document"], -1)
    odd = {**batch, "input_ids": torch.cat([batch["input_ids"], torch.zeros_like(batch["input_ids"])]),
           "labels": torch.cat([batch["labels"], torch.full_like(batch["labels"], IGNORE_INDEX)]),
           "document": torch.cat([batch["document"], empty_row])}  # two images, two rows: read as one document each
    with pytest.raises(RuntimeError, match="PrefixBlocks takes one right-padded document per row"):
        model(**odd)
    labelled_start = padded_batch([5, 5])
    labelled_start["labels"][1, 0] = 3
    with pytest.raises(RuntimeError, match="a row starts with a labelled token"):
        model(**{k: v for k, v in labelled_start.items() if k != "label_positions"})

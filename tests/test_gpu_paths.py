"""On a GPU: the kernels the fast path takes there compute what the dense-mask SDPA reference computes.

test_fast_path.py checks the same rules with the CPU's kernels. On a GPU other code runs: flash-attention
with GQA under a bottom-right causal mask (the prefix mask of padded rows, by blocks), FlexAttention compiled
into a Triton kernel (the other masks and packed rows; alone, and inside compiled blocks as train.py runs it),
and the loss's compiled softmax. Each runs in bf16 autocast, as training does, and is compared with the
reference in fp32: it must come as close as the reference in bf16 does. At Qwen2.5-0.5B's attention geometry
(14 query heads of 64 over 2 key-value heads) and so400m's 256 image tokens, in two small layers. CI has no GPU:
skipped there, run by hand (README, Tests)."""
import copy

import pytest
import torch

import data
import fast_path
from fast_path import fused_softmax_cross_entropy, softmax_cross_entropy
from model import IGNORE_INDEX, VLM, Qwen2Config, SigLIPConfig, VLMConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's kernels need a GPU")
DEVICE = "cuda"
N_IMAGE = 256


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = VLMConfig(SigLIPConfig(image_size=224, patch_size=14, hidden_size=128, intermediate_size=256,
                                    num_hidden_layers=2, num_attention_heads=2),
                       Qwen2Config(vocab_size=1000, hidden_size=896, intermediate_size=1024, num_hidden_layers=2,
                                   num_attention_heads=14, num_key_value_heads=2), projector_hidden=128)
    return VLM(config).to(DEVICE)


def samples(lengths, seed=0):
    """Random texts of the given lengths; the first 8 tokens of each are a prompt without loss."""
    generator = torch.Generator().manual_seed(seed)
    made = []
    for n in lengths:
        input_ids = torch.randint(0, 1000, (n,), generator=generator)
        labels = input_ids.clone()
        labels[:8] = IGNORE_INDEX
        made.append({"pixel_values": torch.randn(3, 224, 224, generator=generator), "input_ids": input_ids,
                     "labels": labels})
    return made


def padded_batch(lengths):
    return data.collate(samples(lengths), N_IMAGE, pad_id=0)


def packed_batch(lengths, row_length):
    return data.pack_documents(samples(lengths), max_len=row_length, n_image_tokens=N_IMAGE)


def loss_and_gradient(model, fast, batch, mask_kind, bf16):
    model.fast_path = fast_path.FastPath() if fast else None
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
        loss = model(**{k: v.to(DEVICE) for k, v in batch.items()}, mask_kind=mask_kind)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def assert_as_close_as_the_dense_mask_in_bf16(reference_model, model, batch, mask_kind):
    exact_loss, exact_gradient = loss_and_gradient(reference_model, False, batch, mask_kind, bf16=False)
    dense_loss, dense_gradient = loss_and_gradient(reference_model, False, batch, mask_kind, bf16=True)
    loss, gradient = loss_and_gradient(model, True, batch, mask_kind, bf16=True)
    assert abs(loss - exact_loss) <= 2 * abs(dense_loss - exact_loss) + 1e-3 * abs(exact_loss), (loss, dense_loss, exact_loss)
    error, dense_error = (gradient - exact_gradient).norm().item(), (dense_gradient - exact_gradient).norm().item()
    assert error <= 2 * dense_error + 1e-3 * exact_gradient.norm().item(), (error, dense_error)


# 400 tokens (256 + 144) do not fill 128-token blocks: the kernels' edge handling runs too. The prefix mask of
# padded rows runs by blocks on flash kernels, the other masks on FlexAttention.
@pytest.mark.parametrize("mask_kind", ["prefix", "prefix_prompt", "bidirectional", "causal"])
def test_padded_rows_on_the_gpus_kernels(model, mask_kind):
    assert_as_close_as_the_dense_mask_in_bf16(model, model, padded_batch([144, 100, 37]), mask_kind)


@pytest.mark.parametrize("mask_kind", ["prefix", "prefix_prompt"])
def test_packed_rows_on_the_gpus_kernels(model, mask_kind):
    batch = packed_batch([300, 40, 144, 90, 12, 200], row_length=1024)
    assert batch["document"].max() >= 2  # three documents share a row
    assert_as_close_as_the_dense_mask_in_bf16(model, model, batch, mask_kind)


@pytest.mark.parametrize("mask_kind", ["prefix", "prefix_prompt", "bidirectional"])
def test_compiled_blocks_as_train_py_runs_them(model, mask_kind):
    compiled = copy.deepcopy(model)
    fast_path.compile_blocks(fast_path.use_fast_path(compiled), "default")
    assert_as_close_as_the_dense_mask_in_bf16(model, compiled, padded_batch([144, 100, 37]), mask_kind)


def test_compiled_softmax_cross_entropy_equals_the_eager_one():
    torch.manual_seed(0)
    logits = (3 * torch.randn(300, 5000, device=DEVICE)).bfloat16()
    targets = torch.randint(0, 5000, (300,), device=DEVICE)
    targets[::7] = IGNORE_INDEX
    loss, gradient = fused_softmax_cross_entropy(logits, targets)
    expected_loss, expected_gradient = softmax_cross_entropy(logits, targets)
    assert gradient.dtype == torch.bfloat16
    assert abs(loss.item() - expected_loss.item()) <= 1e-4 * abs(expected_loss.item())
    torch.testing.assert_close(gradient.float(), expected_gradient.float(), rtol=2e-2, atol=1e-4)

"""On a GPU: blocks replayed as CUDA graphs (train.py's compile_mode="reduce-overhead") give the gradients that
eager blocks give, gradient accumulation over micro-batches included, for several steps (the graphs are
recorded on the first calls and replayed after); packed rows, whose mask is new in every batch, replay the
graphs without recording them again. CI has no GPU, so there this module is skipped and counts for nothing;
run it by hand on a GPU (README, Performance)."""
import copy

import pytest
import torch

import data
import fast_path
import shapes
import train
from test_train import tiny_setup

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.fixture(scope="module", autouse=True)
def fresh_compiler():
    """Compiled blocks of other test modules (other shapes) would otherwise share the blocks' compile caches."""
    torch._dynamo.reset()


def graphed_copy(eager, cfg):
    eager.to("cuda")
    graphed = copy.deepcopy(eager)
    for model in (eager, graphed):
        fast_path.use_fast_path(model)
    fast_path.compile_blocks(graphed, cfg["compile_mode"])
    torch._dynamo.utils.counters.clear()
    return graphed


def assert_step_gives_eager_gradients(cfg, eager, graphed, micro_batches, trainable, step):
    results = []
    for model in (eager, graphed):
        model.zero_grad(set_to_none=True)
        loss = train.train_step(model, micro_batches, {**cfg, "compile": model is graphed}, torch.device("cuda"), trainable)[0]
        results.append((loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}))
    (eager_loss, eager_grads), (graphed_loss, graphed_grads) = results
    fp32 = cfg["dtype"] == "float32"
    assert abs(graphed_loss - eager_loss) < (1e-4 if fp32 else 2e-3) * abs(eager_loss), step
    assert eager_grads.keys() == graphed_grads.keys()
    if fp32:
        for name, grad in eager_grads.items():  # atol: some gradients are 0 but for rounding (a key's bias)
            torch.testing.assert_close(graphed_grads[name], grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{step} {name}: {m}")
    else:  # bf16: compiled and eager kernels round differently, so each layer's gradient is compared as a whole,
        # weight and bias together (a key's bias alone is 0 but for rounding)
        for layer in {name.rsplit(".", 1)[0] for name in eager_grads}:
            names = [name for name in eager_grads if name.rsplit(".", 1)[0] == layer]
            grad = torch.cat([eager_grads[name].flatten() for name in names])
            error = (torch.cat([graphed_grads[name].flatten() for name in names]) - grad).norm().item()
            assert error <= 2e-2 * grad.norm().item() + 1e-6, f"step {step} {layer}: {error} against {grad.norm().item()}"
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"], "the blocks did not run as CUDA graphs"


def test_cuda_graphs_accumulate_gradients_as_eager_blocks_do():
    cfg, tokenizer, eager, trainable, _ = tiny_setup(device="cuda", global_batch=12, micro_batch=4, fast_path=True,
                                                     compile=True, compile_mode="reduce-overhead")
    assert trainable == ["vision", "projector", "language"]
    graphed = graphed_copy(eager, cfg)
    batches = train.endless(train.open_stream(cfg, tokenizer, eager))
    for step in range(4):
        micro_batches = next(batches)
        assert len(micro_batches) == 3
        assert_step_gives_eager_gradients(cfg, eager, graphed, micro_batches, trainable, step)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_rows_replay_the_graphs_each_with_its_own_mask(monkeypatch, dtype):
    """Every batch of packed rows has its own FlexAttention mask, built outside the blocks. fast_path.FixedInputs
    keeps it (and RoPE's tables) at the addresses where the graphs were recorded: after the first two steps
    (warm-up, recording), batches of the same shape but other documents replay the graphs without recording
    anything, and each trains under its own mask (eager blocks' gradients)."""
    from torch._inductor import cudagraph_trees
    recordings = []
    record_function = cudagraph_trees.CUDAGraphTreeManager.record_function

    def counted(manager, *args, **kwargs):
        recordings.append(1)
        return record_function(manager, *args, **kwargs)
    monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, "record_function", counted)

    cfg, tokenizer, eager, trainable, _ = tiny_setup(device="cuda", shapes_questions=2, fast_path=True,
                                                     dtype=dtype, compile=True, compile_mode="reduce-overhead")
    source = shapes.SyntheticShapes(16, image_size=32, questions=2)
    samples = [data.make_sample(source.record(i), tokenizer, 32, 256, data.DEFAULT_SYSTEM_PROMPT)[0] for i in range(16)]
    batches = [data.pack_documents(samples, 256, eager.n_image_tokens, rows=[[i, i + 1], [i + 2, i + 3]],
                                   pad_to_multiple=256) for i in range(0, 16, 4)]  # 2 rows of 256, 2 documents each
    assert len({b["document"].shape for b in batches}) == 1
    assert len({tuple(b["document"].flatten().tolist()) for b in batches}) > 1  # documents cut in other places
    graphed = graphed_copy(eager, cfg)
    for step, batch in enumerate(batches):
        assert_step_gives_eager_gradients(cfg, eager, graphed, [batch], trainable, step)
        if step == 1:
            recorded = len(recordings)
    assert recorded > 0 and len(recordings) == recorded, "packed rows recorded the CUDA graphs again"

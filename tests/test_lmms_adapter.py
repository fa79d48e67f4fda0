"""lmms_adapter.py: our model on lmms-eval's interface, fed hand-made Instances offline (no task downloads), against
our own answers (sample.answer) and loss (model.VLM.forward). Needs the optional extra (requirements-lmms.txt)."""
import importlib.util
import os
from importlib.metadata import entry_points

import pytest
import torch
from PIL import Image

from conftest import save_image, save_tiny_checkpoint
from data import preprocess_image
from model import IGNORE_INDEX, prompt_rows
from sample import answer, prompt_ids

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra: requirements-lmms.txt")
from lmms_eval.api.instance import Instance  # noqa: E402

import lmms_adapter  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What is in the image?", "Provide a one-sentence caption for the provided image.", "Which colour?"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """VLMAlign over a tiny checkpoint, with a hand-made task of three documents (lmms-eval fills task_dict)."""
    root = tmp_path_factory.mktemp("lmms")
    vlm = lmms_adapter.VLMAlign(checkpoint=str(save_tiny_checkpoint(root)), batch_size=2)
    documents = [{"image": Image.open(save_image(root / f"{i}.png", i)), "question": q} for i, q in enumerate(QUESTIONS)]
    vlm.task_dict = {"tiny": {"test": documents}}
    return vlm


def instance(kind, context, second, doc_id):
    """A request as lmms-eval's simple models get it: (context, gen_kwargs | target, doc_to_visual, doc_id, task, split)."""
    return Instance(request_type=kind, arguments=(context, second, lambda doc: [doc["image"]], doc_id, "tiny", "test"),
                    idx=0, metadata={"task": "tiny", "doc_id": doc_id, "repeats": 1})


def test_generate_until_gives_our_answers_in_order(adapter):
    settings = {"max_new_tokens": 8, "temperature": 0, "until": []}
    requests = [instance("generate_until", q, dict(settings), i) for i, q in enumerate(QUESTIONS)]
    expected = [answer(adapter.model, adapter.tokenizer, [adapter.task_dict["tiny"]["test"][i]["image"]], [q],
                       max_new_tokens=8)[0] for i, q in enumerate(QUESTIONS)]  # one at a time, unbatched
    assert adapter.generate_until(requests) == expected
    stop = expected[0][2:4]
    cut = adapter.generate_until([instance("generate_until", QUESTIONS[0], {**settings, "until": [stop]}, 0)])
    assert cut == [expected[0][:expected[0].index(stop)]]


@pytest.mark.parametrize("mask_kind", ["prefix", "prefix_prompt"])  # prefix_prompt: the answer must not be seen ahead
def test_loglikelihood_is_minus_our_summed_loss(adapter, mask_kind, monkeypatch):
    model, tokenizer = adapter.model, adapter.tokenizer
    monkeypatch.setattr(model.config, "mask_kind", mask_kind)
    document = adapter.task_dict["tiny"]["test"][1]
    continuation = "A cat sits on a red mat."
    [(logprob, greedy)] = adapter.loglikelihood([instance("loglikelihood", QUESTIONS[1], continuation, 1)])
    prompt, target = prompt_ids(tokenizer, QUESTIONS[1]), tokenizer.encode_text(continuation)
    input_ids = torch.tensor([prompt + target])
    rows, doc = prompt_rows(input_ids, torch.ones_like(input_ids, dtype=torch.bool), model.n_image_tokens)
    labels = torch.full_like(rows, IGNORE_INDEX)
    labels[0, -len(target):] = torch.tensor(target)  # the loss of training: on the answer only (eq. 1)
    with torch.no_grad():
        loss = model(preprocess_image(document["image"], model.config.vision.image_size)[None], rows, labels, doc,
                     mask_kind=model.config.mask_kind)
    assert logprob == pytest.approx(-loss.item() * len(target), rel=1e-5)
    assert greedy is False  # a random model does not say this


def test_loglikelihood_marks_the_greedy_answer(adapter):
    """The model's own greedy answer is its argmax at every step (as much of it as survives decoding to text and
    encoding again: the random model makes stray bytes)."""
    model, tokenizer = adapter.model, adapter.tokenizer
    prompt = prompt_ids(tokenizer, QUESTIONS[0])
    image = preprocess_image(adapter.task_dict["tiny"]["test"][0]["image"], 56)[None]
    ids = model.generate(image, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.bool), max_new_tokens=6)[0]
    text = next(tokenizer.decode(ids[:k]) for k in range(len(ids), 0, -1)
                if tokenizer.encode_text(tokenizer.decode(ids[:k])) == ids[:k])
    [(logprob, greedy)] = adapter.loglikelihood([instance("loglikelihood", QUESTIONS[0], text, 0)])
    [(other_logprob, other_greedy)] = adapter.loglikelihood([instance("loglikelihood", QUESTIONS[0], text + "!?", 0)])
    assert greedy and not other_greedy and other_logprob < logprob < 0


def test_refusals(adapter):
    with pytest.raises(NotImplementedError):
        adapter.generate_until_multi_round([])
    with pytest.raises(ValueError, match="sampling"):
        adapter.generate_until([instance("generate_until", "Hi", {"do_sample": True}, 0)])
    two_images = Instance(request_type="generate_until", idx=0, metadata={"task": "tiny", "doc_id": 0, "repeats": 1},
                          arguments=("Hi", {}, lambda doc: [doc["image"], doc["image"]], 0, "tiny", "test"))
    with pytest.raises(ValueError, match="one image per question; tiny test doc 0 has 2"):
        adapter.generate_until([two_images])
    with pytest.raises(ValueError, match="unknown model_args"):
        lmms_adapter.VLMAlign(checkpoint="unused", pretrained="x")


def test_the_plugins_manifest_registers_the_adapter():
    """What lmms-eval's registry does with the `lmms_eval.models` entry point: resolve vlm_align to our class."""
    from lmms_eval.models.registry_v2 import ModelRegistryV2
    spec = importlib.util.spec_from_file_location("vlm_align_lmms", os.path.join(ROOT, "lmms_plugin", "vlm_align_lmms.py"))
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    registry = ModelRegistryV2()
    registry.register_manifest(plugin.manifest())
    assert registry.get_model_class("vlm_align") is lmms_adapter.VLMAlign


@pytest.mark.skipif(not entry_points(group="lmms_eval.models", name="vlm_align"),
                    reason="the plugin is not installed: pip install --no-deps --no-build-isolation -e lmms_plugin")
def test_lmms_eval_finds_vlm_align_through_its_entry_point():
    from lmms_eval.models import get_model
    assert get_model("vlm_align").__name__ == "VLMAlign"

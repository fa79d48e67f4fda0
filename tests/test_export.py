"""export.py: the transformers folder computes our model. Logits at every position, greedy generation (dynamic and
static caches, a left-padded batch) and the processor's inputs, against our own model, on tiny random weights;
names, shapes and the processor at the full sizes (meta device, the real Qwen tokenizer)."""
import json
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image

import export
from conftest import save_image, save_qwen2, save_siglip, tiny_tokenizer
from data import Tokenizer, encode_conversation, preprocess_image
from data_helpers import copy_qwen_bpe_files
from model import VLM, Qwen2Config, SigLIPConfig, VLMConfig, prompt_rows
from sample import left_pad, prompt_ids

transformers = pytest.importorskip("transformers")

N_IMAGE_TOKENS = 16  # the tiny SigLIP: 56x56 pixels, 14x14 patches
PROMPTS = ["What is in the image?", "Provide a one-sentence caption for the provided image."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random checkpoint that Llava can hold: projector width = the language model's, free embedding rows."""
    root = tmp_path_factory.mktemp("export")
    tokenizer = tiny_tokenizer()
    save_siglip(root / "siglip", num_hidden_layers=3)
    save_qwen2(root / "qwen2", initializer_range=0.3, vocab_size=tokenizer.vocab_size + 8)
    model = VLM.from_pretrained(vision=str(root / "siglip"), language=str(root / "qwen2"), projector_hidden=64)
    torch.manual_seed(0)
    with torch.no_grad():  # a projector whose image tokens matter as much as the text's
        for p in model.projector.parameters():
            p.normal_(0, 0.3)
    model.save(root / "checkpoint", tokenizer=tokenizer)
    return root / "checkpoint"


def export_without_transformers(checkpoint, out, monkeypatch, **kwargs):
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "transformers", None)  # `import transformers` fails while exporting
        return str(export.export(str(checkpoint), str(out), dtype="float32", **kwargs))


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return export_without_transformers(checkpoint, tmp_path_factory.mktemp("hf") / "prefix", monkeypatch)


@pytest.fixture(scope="module")
def ours(checkpoint):
    return VLM.load(checkpoint).eval(), Tokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def theirs(exported):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model, loading = AutoModelForImageTextToText.from_pretrained(exported, trust_remote_code=True,
                                                                 output_loading_info=True)
    assert not any(loading.values()), loading  # no tensor missing, unexpected or of another shape
    return model.eval(), AutoProcessor.from_pretrained(exported, backend="pil")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return [Image.open(save_image(folder / f"{seed}.png", seed)) for seed in range(2)]


def chat_text(processor, prompt):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def our_logits(model, image, input_ids, mask_kind):
    """Our logits at every position of [image | input_ids], one sequence."""
    rows, document = prompt_rows(input_ids[None], torch.ones(1, len(input_ids), dtype=torch.bool), N_IMAGE_TOKENS)
    pixel_values = preprocess_image(image, model.config.vision.image_size)[None]
    with torch.no_grad():
        return model.language.lm_head(model.hidden_states(model.image_tokens(pixel_values), rows, document, mask_kind))[0]


def conversation_inputs(processor, tokenizer, image):
    """A question and its answer laid out as training lays them out (data.encode_conversation), for the processor."""
    ids, _ = encode_conversation(tokenizer, [{"from": "human", "value": "<image>\nWhat is it?"},
                                             {"from": "gpt", "value": "A cat sits on a red mat."}])
    input_ids = torch.tensor([processor.image_token_id] * N_IMAGE_TOKENS + ids)
    pixel_values = processor(images=[image], text=[processor.image_token], return_tensors="pt")["pixel_values"]
    return torch.tensor(ids), {"input_ids": input_ids[None], "pixel_values": pixel_values}


def test_logits_equal_ours_at_every_position(ours, theirs, images):
    (model, tokenizer), (llava, processor) = ours, theirs
    ids, inputs = conversation_inputs(processor, tokenizer, images[0])
    with torch.no_grad():
        logits = llava(**inputs).logits[0]
    torch.testing.assert_close(logits, our_logits(model, images[0], ids, "prefix"), rtol=1e-5, atol=1e-5)


def test_without_remote_code_it_is_causal_llava(exported, ours, theirs, images):
    """The folder loads without trust_remote_code too, silently as causal Llava: our causal model, not ours."""
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration
    (model, tokenizer), (_, processor) = ours, theirs
    stock = AutoModelForImageTextToText.from_pretrained(exported).eval()
    assert type(stock) is LlavaForConditionalGeneration
    ids, inputs = conversation_inputs(processor, tokenizer, images[0])
    with torch.no_grad():
        logits = stock(**inputs).logits[0]
    torch.testing.assert_close(logits, our_logits(model, images[0], ids, "causal"), rtol=1e-5, atol=1e-5)
    assert (logits - our_logits(model, images[0], ids, "prefix")).abs().max() > 0.1


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generation_of_a_left_padded_batch_gives_our_tokens(ours, theirs, images, cache):
    (model, tokenizer), (llava, processor) = ours, theirs
    pixel_values = torch.stack([preprocess_image(image, model.config.vision.image_size) for image in images])
    input_ids, text_mask = left_pad([prompt_ids(tokenizer, p) for p in PROMPTS], tokenizer.pad_id)
    expected = model.generate(pixel_values, input_ids, text_mask, max_new_tokens=10)
    inputs = processor(images=images, text=[chat_text(processor, p) for p in PROMPTS], padding=True,
                       return_tensors="pt")
    assert inputs["attention_mask"].sum(1).tolist() != [inputs["input_ids"].shape[1]] * 2  # one row is padded
    output = llava.generate(**inputs, max_new_tokens=10, do_sample=False,
                            cache_implementation="static" if cache == "static" else None)
    ends = llava.generation_config.eos_token_id
    generated = [until_end(row.tolist(), ends) for row in output[:, inputs["input_ids"].shape[1]:]]
    assert generated == expected


def until_end(tokens, ends):
    return next((tokens[:i] for i, t in enumerate(tokens) if t in ends), tokens)


def test_processor_gives_our_pixels_and_token_ids(ours, theirs, images):
    (_, tokenizer), (_, processor) = ours, theirs
    for image, prompt in zip(images, PROMPTS):
        inputs = processor(images=image, text=chat_text(processor, prompt), return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == [processor.image_token_id] * N_IMAGE_TOKENS + prompt_ids(tokenizer, prompt)
        torch.testing.assert_close(inputs["pixel_values"][0], preprocess_image(image, 56), rtol=0, atol=0)
    as_llava_writes_it = processor.apply_chat_template([{"role": "user", "content": "<image>\n " + PROMPTS[0]}],
                                                       add_generation_prompt=True)
    assert as_llava_writes_it == chat_text(processor, PROMPTS[0])  # lmms-eval's llava_hf style: "<image>\n" in the text


def test_folder_declares_the_mask(exported):
    with open(f"{exported}/config.json") as f:
        config = json.load(f)
    assert config["is_mm_prefix_lm"] is True
    assert config["auto_map"] == {"AutoModelForImageTextToText": export.REMOTE_CLASS}
    assert config["architectures"] == ["LlavaForConditionalGeneration"]  # what vLLM picks its Llava by
    with open(f"{exported}/README.md") as f:
        card = f.read()
    assert "trust_remote_code=True" in card and "causal Llava" in card and "Fig. 3b" in card
    assert "(3 layers of width" in card  # this model's sizes, not the paper's


def under_mask(checkpoint, mask_kind, folder):
    """The checkpoint's weights saved as if trained under `mask_kind` (the mask lives in its config.json)."""
    model = VLM.load(checkpoint)
    model.config.mask_kind = mask_kind
    model.save(folder, tokenizer=Tokenizer.from_pretrained(checkpoint))
    return folder


def test_a_causal_checkpoint_exports_as_plain_llava(checkpoint, ours, images, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration
    causal = under_mask(checkpoint, "causal", tmp_path / "causal_checkpoint")
    folder = export_without_transformers(causal, tmp_path / "causal", monkeypatch)
    with open(f"{folder}/config.json") as f:
        config = json.load(f)
    assert "auto_map" not in config and "is_mm_prefix_lm" not in config
    assert not (tmp_path / "causal" / export.REMOTE_CODE).exists()
    llava = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(llava) is LlavaForConditionalGeneration
    model, tokenizer = ours
    ids, inputs = conversation_inputs(AutoProcessor.from_pretrained(folder, backend="pil"), tokenizer, images[1])
    with torch.no_grad():
        logits = llava(**inputs).logits[0]
    torch.testing.assert_close(logits, our_logits(model, images[1], ids, "causal"), rtol=1e-5, atol=1e-5)


def full_size_config():
    return VLMConfig(SigLIPConfig(), Qwen2Config())


def test_full_size_names_and_shapes_are_llavas():
    """At the paper's sizes, on the meta device: our tensors under their Llava names are exactly the tensors of
    the model transformers builds from the exported config.json, and the config says what the issue lists."""
    from transformers import LlavaConfig
    from modeling_prefix_llava import PrefixLlavaForConditionalGeneration
    config = full_size_config()
    tokenizer = type("QwenIds", (), {"eos_id": 151643, "im_end_id": 151645, "pad_id": 151643})
    llava_json = export.llava_config(config, tokenizer, 151665, prefix=True, dtype_name="bfloat16")
    with torch.device("meta"):
        llava = PrefixLlavaForConditionalGeneration(LlavaConfig(**llava_json))
        model = VLM(config)
    theirs = {n: t.shape for n, t in llava.state_dict().items() if n != "lm_head.weight"}  # tied
    # llava-hf's file names keep SigLIP's `vision_model.`, which transformers 5 maps onto its flatter vision tower
    # when loading (the tiny models above load with no tensor missing or unexpected)
    ours = {n.replace("vision_tower.vision_model.", "vision_tower."): t.shape
            for n, t in export.llava_tensors(model, torch.bfloat16).items()}
    assert ours == theirs
    assert llava.config.vision_config.vision_use_head is False
    assert (llava.config.image_seq_length, llava.config.vision_feature_layer) == (256, -2)
    assert llava.config.tie_word_embeddings and llava.config.projector_hidden_act == "gelu"


def test_logits_equal_ours_at_full_width(tmp_path, images, monkeypatch):
    """The paper's widths (SigLIP so400m, Qwen2.5-0.5B: heads, GQA, 256 image tokens of 224 pixels, the 151936-row
    vocabulary, the real tokenizer) at 2 layers each, random weights: the exported model's logits are ours at every
    position."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    config = replace(full_size_config(), vision=SigLIPConfig(num_hidden_layers=2),
                     language=Qwen2Config(num_hidden_layers=2))
    torch.manual_seed(0)
    model = VLM(config).eval()
    tokenizer = Tokenizer.from_pretrained(copy_qwen_bpe_files(tmp_path / "qwen"))
    model.save(tmp_path / "checkpoint", tokenizer=tokenizer)
    folder = export_without_transformers(tmp_path / "checkpoint", tmp_path / "hf", monkeypatch)
    llava = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    ids, _ = encode_conversation(tokenizer, [{"from": "human", "value": "<image>\nWhat is it?"},
                                             {"from": "gpt", "value": "A cat sits on a red mat."}])
    input_ids = torch.tensor([processor.image_token_id] * 256 + ids)[None]
    pixel_values = processor(images=[images[0]], text=[processor.image_token], return_tensors="pt")["pixel_values"]
    rows, document = prompt_rows(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), 256)
    with torch.no_grad():
        logits = llava(input_ids=input_ids, pixel_values=pixel_values).logits[0]
        hidden = model.hidden_states(model.image_tokens(preprocess_image(images[0], 224)[None]), rows, document, "prefix")
        expected = model.language.lm_head(hidden)[0]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_full_size_processor_with_the_real_qwen_tokenizer(tmp_path):
    """Qwen2.5's tokenizer: <image> on row 151665 (the first free one of 151936), and a multi-turn conversation
    tokenised by the processor's chat template exactly as training encodes it."""
    from transformers import AutoProcessor
    tokenizer = Tokenizer.from_pretrained(copy_qwen_bpe_files(tmp_path / "qwen"))
    assert export.write_processor(str(tmp_path / "hf"), tokenizer, full_size_config()) == 151665
    processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    turns = [("What is in the image?", "A cat. It's 6.28 café 🐈"), ("And the colour?", "Red.\n- item 1")]
    messages = [{"role": role, "content": text} for question, answer in turns
                for role, text in (("user", question), ("assistant", answer))]
    image = Image.new("RGB", (300, 200), (200, 30, 60))
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                           "text": turns[0][0]}]}]
                                         + messages[1:], add_generation_prompt=False)
    inputs = processor(images=image, text=text, return_tensors="pt")
    expected, _ = encode_conversation(tokenizer, [{"from": "human" if m["role"] == "user" else "gpt",
                                                   "value": m["content"]} for m in messages])
    assert inputs["input_ids"][0].tolist() == [151665] * 256 + expected
    torch.testing.assert_close(inputs["pixel_values"][0], preprocess_image(image), rtol=0, atol=0)


def test_what_llava_cannot_hold_is_refused():
    config = full_size_config()
    with pytest.raises(ValueError, match="vision_feature_layer -1"):
        export.check_exportable(replace(config, vision_feature_layer=-1))
    with pytest.raises(ValueError, match="projector_hidden 32"):
        export.check_exportable(replace(config, projector_hidden=32))
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="no free|none free"):
        export.add_image_token(tokenizer, tokenizer.vocab_size)


def test_prefix_prompt_checkpoint_is_refused(checkpoint, tmp_path):
    prefix_prompt = under_mask(checkpoint, "prefix_prompt", tmp_path / "prefix_prompt_checkpoint")
    with pytest.raises(ValueError, match="prefix_prompt checkpoint cannot be exported"):
        export.export(str(prefix_prompt), str(tmp_path / "out"))


def test_push_arguments(monkeypatch, exported, tmp_path, checkpoint):
    """--push hands the written folder and repo id to huggingface_hub (the upload itself needs the network)."""
    calls = []
    monkeypatch.setattr(export, "push", lambda folder, repo_id, private: calls.append((folder, repo_id, private)))
    monkeypatch.setattr(export, "export", lambda checkpoint, out, dtype: out)
    export.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "hf"), "--push", "me/model", "--private"])
    assert calls == [(str(tmp_path / "hf"), "me/model", True)]
    with pytest.raises(SystemExit):
        export.parse_args(["--checkpoint", str(checkpoint), "--out", "x", "--private"])  # --private without --push

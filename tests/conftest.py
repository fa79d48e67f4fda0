"""Shared fixtures: small random-weight SigLIP and Qwen2 models built by transformers (the reference
implementation) and saved in the official Hub layout, so our loaders read exactly what they read from the Hub;
and a tiny checkpoint of ours with its tokenizer, for sample.py and eval.py."""
import pytest
import torch
from PIL import Image

from data import SHORT_CAPTION_PROMPT, chat_prompt, train_tokenizer
from model import VLM


def save_siglip(folder, seed=0, with_text_tower=False, **overrides):
    """A random SiglipVisionModel saved as `folder`; returns the transformers model (eval mode).

    transformers 5 saves a lone vision tower without the `vision_model.` prefix; the Hub's so400m file is a
    whole SiglipModel (`with_text_tower`), whose vision tensors carry it."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel
    sizes = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                 image_size=56, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    sizes.update(overrides)
    torch.manual_seed(seed)
    if with_text_tower:  # the official file holds both towers, the pooling head, logit_scale and logit_bias
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
        full = randomise_norms_and_biases(SiglipModel(SiglipConfig(text_config=text, vision_config=sizes)).eval())
        full.save_pretrained(folder)
        return full.vision_model
    model = randomise_norms_and_biases(SiglipVisionModel(SiglipVisionConfig(**sizes)).eval())
    model.save_pretrained(folder)
    return model


def randomise_norms_and_biases(model):
    """transformers starts every norm at weight 1, bias 0, and most biases at 0: a loader that dropped them
    would still match. Trained checkpoints are not like that, so neither are ours."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1, 0.1)
    return model


def save_qwen2(folder, seed=0, tie=True, max_shard_size=None, **overrides):
    """A random Qwen2ForCausalLM saved as `folder`; returns the transformers model (eval mode)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300, max_position_embeddings=1024, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=tie)
    sizes.update(overrides)
    torch.manual_seed(seed)
    model = randomise_norms_and_biases(Qwen2ForCausalLM(Qwen2Config(**sizes)).eval())
    with torch.no_grad():  # large q/k/v biases, as Qwen2's are
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model


# What the tiny tokenizer learns from, and the eval tests' reference captions: the random model's answers mix
# these words with stray bytes, so their caption scores are small but not all zero.
CAPTIONS = ["A cat sits on a red mat.", "Two dogs run across a green park.", "A man rides a brown horse on the beach.",
            "A plate of food with a fork and a knife.", "A group of people standing next to a bus.",
            "A little girl holding a kite in the sky.", "A train is going down the tracks.",
            "A bowl of fruit on a wooden table.", "A person riding a bike down the street."]


def tiny_tokenizer():
    """A byte-level BPE learnt from a few captions and the prompt (the recipe of shapes.shapes_tokenizer)."""
    prompt = chat_prompt([{"role": "user", "content": SHORT_CAPTION_PROMPT}])
    return train_tokenizer(CAPTIONS + [prompt], vocab_size=400)


def save_tiny_checkpoint(folder):
    """A random VLM (SigLIP 56x56 -> 16 image tokens, 2-layer Qwen2) saved with its tokenizer, as train.py would.
    The large initializer makes the greedy answers varied instead of one token repeated."""
    tokenizer = tiny_tokenizer()
    save_siglip(folder / "siglip")
    save_qwen2(folder / "qwen2", initializer_range=0.3, vocab_size=tokenizer.vocab_size)
    model = VLM.from_pretrained(vision=str(folder / "siglip"), language=str(folder / "qwen2"), projector_hidden=32)
    model.save(folder / "checkpoint", tokenizer=tokenizer)
    return folder / "checkpoint"


def save_image(path, seed):
    """A random-noise RGB image, so that every image gives the model different pixels."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (40 + seed, 60, 3), generator=generator, dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory):
    """Folders of a tiny SigLIP (4x4 = 16 image tokens) and a tiny Qwen2, for the VLM tests."""
    root = tmp_path_factory.mktemp("backbones")
    save_siglip(root / "siglip")
    save_qwen2(root / "qwen2")
    return root / "siglip", root / "qwen2"

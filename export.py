"""Export a checkpoint as a transformers model folder (Llava layout), for the Hub, transformers, vLLM and lmms-eval.

    python export.py --checkpoint out/stage3 --out hf/                    # a folder transformers loads
    python export.py --checkpoint out/stage3 --out hf/ --push user/name   # ... and upload it to the Hub

Our architecture is LlavaForConditionalGeneration's exactly: SigLIP without its pooling head, the features of
`vision_feature_layer` ("full": no CLS to drop), a 2-layer GELU projector with biases, Qwen2, tied embeddings.
The one difference is the mask (paper 3.2): a prefix-trained model ships modeling_prefix_llava.py as remote code
(trust_remote_code) and `"is_mm_prefix_lm": true` for vLLM; a causal-trained one is plain Llava. Everything is
written here with json and safetensors: exporting needs no transformers.
"""
import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

from checkpoints import checkpoint_folder
from data import DEFAULT_SYSTEM_PROMPT, IMAGE_MEAN, IMAGE_STD, Tokenizer
from model import VLM

IMAGE_TOKEN = "<image>"
REMOTE_CODE = "modeling_prefix_llava.py"
REMOTE_CLASS = "modeling_prefix_llava.PrefixLlavaForConditionalGeneration"
MAX_POSITIONS = 32768  # Qwen2.5-0.5B's max_position_embeddings (our config does not keep it)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The chat format of training (data.chat_ids) as a Jinja template: the image's tokens lead everything (paper 3.1),
# then ChatML with the default system turn; each turn's text without LLaVA's "<image>", stripped (data.turn_text).
CHAT_TEMPLATE = (
    "{%- set ns = namespace(image=false) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- if '<image>' in message['content'] %}{% set ns.image = true %}{% endif -%}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' %}{% set ns.image = true %}{% endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.image %}<image>{% endif -%}"
    "{%- if messages[0]['role'] != 'system' %}<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n{% endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string %}{% set text = message['content'] -%}"
    "{%- else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}{% endif -%}"
    "<|im_start|>{{ message['role'] }}\n{{ text | replace('<image>', '') | trim }}<|im_end|>\n"
    "{% endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
)


# -----------------------------------------------------------------------------
# The weights, under llava-hf's names (those vLLM's Llava maps; transformers 5's save_pretrained writes others)

def llava_name(name):
    """Our state-dict name -> LlavaForConditionalGeneration's."""
    if name.startswith("vision."):
        rest = name.removeprefix("vision.")
        rest = rest.replace("patch_embedding", "embeddings.patch_embedding", 1)
        rest = rest.replace("position_embedding", "embeddings.position_embedding", 1)
        rest = rest.replace("layers.", "encoder.layers.", 1) if rest.startswith("layers.") else rest
        return "model.vision_tower.vision_model." + rest
    if name.startswith("projector."):
        return name.replace("projector.fc1", "model.multi_modal_projector.linear_1").replace(
            "projector.fc2", "model.multi_modal_projector.linear_2")
    if name == "language.lm_head.weight":
        return "lm_head.weight"
    if name.startswith("language."):
        return "model.language_model." + name.removeprefix("language.")
    raise ValueError(f"no Llava name for tensor {name}")


def llava_tensors(model, dtype):
    """The model's tensors under Llava's names, in `dtype`; the tied output layer is left out (it is the embedding)."""
    state = model.state_dict()
    if model.config.language.tie_word_embeddings:
        del state["language.lm_head.weight"]
    return {llava_name(n): t.detach().to(dtype).contiguous() for n, t in state.items()}


# -----------------------------------------------------------------------------
# config.json

def vision_config(vision):
    """SigLIP's vision tower without the attention-pooling head (transformers' siglip_vision_model)."""
    return {"model_type": "siglip_vision_model", "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size, "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads, "num_channels": vision.num_channels,
            "image_size": vision.image_size, "patch_size": vision.patch_size, "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": vision.layer_norm_eps, "attention_dropout": 0.0, "vision_use_head": False}


def text_config(language, tokenizer, dtype_name):
    """Qwen2, in the spellings of transformers 4 (rope_theta) and 5 (rope_parameters) both."""
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": language.vocab_size,
            "hidden_size": language.hidden_size, "intermediate_size": language.intermediate_size,
            "num_hidden_layers": language.num_hidden_layers, "num_attention_heads": language.num_attention_heads,
            "num_key_value_heads": language.num_key_value_heads, "hidden_act": "silu",
            "max_position_embeddings": MAX_POSITIONS, "rms_norm_eps": language.rms_norm_eps,
            "rope_theta": language.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": language.rope_theta},
            "use_sliding_window": False, "sliding_window": None, "attention_dropout": 0.0,
            "tie_word_embeddings": language.tie_word_embeddings, "bos_token_id": tokenizer.eos_id,
            "eos_token_id": tokenizer.im_end_id, "pad_token_id": tokenizer.pad_id, "torch_dtype": dtype_name}


def llava_config(config, tokenizer, image_token_id, prefix, dtype_name):
    """LlavaConfig as JSON; with `prefix`, the remote code that keeps the paper's mask and vLLM's flag for it."""
    llava = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
             "vision_config": vision_config(config.vision),
             "text_config": text_config(config.language, tokenizer, dtype_name),
             "image_token_index": image_token_id,
             "image_seq_length": (config.vision.image_size // config.vision.patch_size) ** 2,
             "projector_hidden_act": "gelu",  # Projector: F.gelu, the exact (erf) GELU
             "vision_feature_select_strategy": "full",  # SigLIP has no CLS token: every output is a patch
             "vision_feature_layer": config.vision_feature_layer, "multimodal_projector_bias": True,
             "tie_word_embeddings": config.language.tie_word_embeddings, "torch_dtype": dtype_name}
    if prefix:
        llava["auto_map"] = {"AutoModelForImageTextToText": REMOTE_CLASS}
        llava["is_mm_prefix_lm"] = True  # vLLM: a prefix over the multimodal tokens, with a backend that has one
    return llava


def check_exportable(config):
    """What Llava cannot express, named."""
    if config.vision_feature_layer == -1:
        raise ValueError("vision_feature_layer -1 (the last layer through post_layernorm) has no Llava equivalent: "
                         "Llava's layer -1 is the last layer without the norm. Only checkpoints with -2 .. -N export")
    if config.projector_hidden != config.language.hidden_size:
        raise ValueError(f"projector_hidden {config.projector_hidden} differs from the language model's width "
                         f"{config.language.hidden_size}: Llava's projector is Linear(vision, text), GELU, "
                         "Linear(text, text)")


# -----------------------------------------------------------------------------
# The processor: tokenizer (+ the image token), chat template, SigLIP's preprocessing, Llava's processor settings

def add_image_token(tokenizer, embedding_rows):
    """Add <image> as a special token on the first embedding row no token uses (Qwen2.5: 151665 of 151936 rows):
    the embedding keeps its size; the row's vector is never read, since image features replace it."""
    image_token_id = tokenizer.vocab_size
    if image_token_id >= embedding_rows:
        raise ValueError(f"the tokenizer uses all {embedding_rows} rows of the embedding: there is none free for "
                         f"{IMAGE_TOKEN}, and the export does not resize the embedding")
    from tokenizers import AddedToken
    tokenizer.tokenizer.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    if tokenizer.tokenizer.token_to_id(IMAGE_TOKEN) != image_token_id:
        raise ValueError(f"the tokenizer already knows {IMAGE_TOKEN} as id {tokenizer.tokenizer.token_to_id(IMAGE_TOKEN)}")
    return image_token_id


def image_processor_config(vision):
    """SiglipImageProcessor doing data.preprocess_image: RGB, bicubic to a square, [0, 1], mean = std = 0.5."""
    return {"image_processor_type": "SiglipImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"height": vision.image_size, "width": vision.image_size}, "resample": 3,  # PIL's BICUBIC
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [IMAGE_MEAN] * 3, "image_std": [IMAGE_STD] * 3}


def processor_config(vision):
    """LlavaProcessor: <image> becomes (image_size / patch_size)^2 image tokens, none dropped ("full")."""
    return {"processor_class": "LlavaProcessor", "image_processor": image_processor_config(vision),
            "image_token": IMAGE_TOKEN, "patch_size": vision.patch_size, "num_additional_image_tokens": 0,
            "vision_feature_select_strategy": "full"}


def tokenizer_config(tokenizer):
    return {"tokenizer_class": "PreTrainedTokenizerFast", "processor_class": "LlavaProcessor",
            "eos_token": "<|im_end|>", "pad_token": tokenizer.tokenizer.id_to_token(tokenizer.pad_id),
            "bos_token": None, "model_max_length": MAX_POSITIONS, "padding_side": "left",
            "extra_special_tokens": {"image_token": IMAGE_TOKEN}, "chat_template": CHAT_TEMPLATE}


def generation_config(tokenizer):
    """Greedy decoding ending at <|im_end|> or <|endoftext|>, as model.VLM.generate."""
    return {"eos_token_id": [tokenizer.im_end_id, tokenizer.eos_id], "pad_token_id": tokenizer.pad_id,
            "do_sample": False}


# -----------------------------------------------------------------------------
# The model card

def checkpoint_name(checkpoint):
    """The checkpoint's run and step ("stage3/step-0005000"), not the local path."""
    parts = os.path.normpath(os.path.abspath(checkpoint)).split(os.sep)
    return "/".join(parts[-2:])


def mask_notes(prefix, n_image_tokens):
    """The model card's words on the mask, the loading line and vLLM, for a prefix or a causal checkpoint."""
    if not prefix:
        return ("**A causal mask** (LLaVA's): it trained and decodes causally, so it is plain Llava, no remote code.",
                "model = AutoModelForImageTextToText.from_pretrained(repo)\n", "vLLM serves it as its Llava.")
    mask = (f"**The prefix mask (paper section 3.2, Fig. 3b).** The {n_image_tokens} image tokens attend to each "
            "other both ways; the text attends causally to earlier text and to every image token. transformers' "
            "Llava is causal, so the mask comes with this folder's remote code, `modeling_prefix_llava.py` (a "
            "Llava subclass: the same weights, the prefix mask in `forward` and in `generate`'s mask creation; "
            "flash-attention 2 is declared unsupported, since it would keep only the padding).\n\n"
            "**Load it with `trust_remote_code=True`.** Without it the folder still loads, silently, as plain "
            "causal Llava: a different model from the one trained, with worse answers and no error.")
    load = "model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)  # the prefix mask\n"
    vllm = ("vLLM ignores the remote code and uses its own Llava. It keeps the prefix when `config.json`'s "
            "`\"is_mm_prefix_lm\": true` is honoured (vLLM from early 2026, with an attention backend that "
            "supports it); older versions run causal attention without a warning.")
    return mask, load, vllm


def model_card(config, prefix, checkpoint):
    """The folder's README.md: what the model is, its mask, the paper's recipe, how to load and prompt it."""
    vision, language = config.vision, config.language
    n_image_tokens = (vision.image_size // vision.patch_size) ** 2
    mask, load, vllm = mask_notes(prefix, n_image_tokens)
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [llava, siglip, qwen2, prefix-lm]
---
# SigLIP + Qwen2 vision-language model (vlm-align)

Exported by `export.py` of vlm-align from its checkpoint `{checkpoint_name(checkpoint)}`: a SigLIP vision encoder
({vision.num_hidden_layers} layers of width {vision.hidden_size}), a 2-layer GELU projector and a Qwen2 decoder
({language.num_hidden_layers} layers of width {language.hidden_size}), {n_image_tokens} image tokens first, the text
after, as in *Improved Alignment of Modalities in Large Vision Language Models* (section 3.1; the paper's own
model: SigLIP so400m and Qwen2.5-0.5B).

{mask}

## The paper's recipe (section 3.4, Table 5), which vlm-align's stage configs follow

| stage | data | trains | mask |
| --- | --- | --- | --- |
| 0 | LLaVA-ReCap-118K (COCO) | projector | bidirectional + 20% noise on the text inputs |
| 1 | LLaVA-ReCap-118K | projector | prefix |
| 2 | LLaVA-ReCap-558K (BLIP) | everything | prefix |
| 3 | LLaVA-NeXT-Data | everything | prefix |

This checkpoint trained and decodes under the `{config.mask_kind}` mask (which stages it went through is its
run's, not recorded here); image features: SigLIP layer
{config.vision_feature_layer} (before the final norm).

## Use

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
from PIL import Image
repo = "this/repo"  # or the exported folder
{load}processor = AutoProcessor.from_pretrained(repo, backend="pil")  # PIL's bicubic resize, as in training
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open("cat.jpg"), text=prompt, return_tensors="pt")
answer = model.generate(**inputs, max_new_tokens=30)[0, inputs["input_ids"].shape[1]:]
print(processor.decode(answer, skip_special_tokens=True))
```

The chat template lays out the input as in training: `<image>` ({n_image_tokens} image tokens) before
everything, then ChatML with the system turn "{DEFAULT_SYSTEM_PROMPT}". Without `backend="pil"` transformers
resizes with torchvision when it is installed, whose bicubic differs slightly from PIL's.

{vllm}
"""


# -----------------------------------------------------------------------------

def export(checkpoint, out, dtype="bfloat16"):
    """Write the transformers folder `out` for our checkpoint folder, under the mask it trained with; returns `out`."""
    model = VLM.load(checkpoint)
    mask_kind = model.config.mask_kind
    if mask_kind not in ("prefix", "causal"):
        raise ValueError(f"{checkpoint} decodes under mask_kind {mask_kind!r}: Llava holds the prefix mask (remote "
                         "code) or the causal one (plain Llava), so a prefix_prompt checkpoint cannot be exported")
    check_exportable(model.config)
    prefix = mask_kind == "prefix"
    os.makedirs(out, exist_ok=True)
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    image_token_id = write_processor(out, tokenizer, model.config)
    save_file(llava_tensors(model, DTYPES[dtype]), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    write_json(os.path.join(out, "config.json"), llava_config(model.config, tokenizer, image_token_id, prefix, dtype))
    write_json(os.path.join(out, "generation_config.json"), generation_config(tokenizer))
    write_text(os.path.join(out, "README.md"), model_card(model.config, prefix, checkpoint))
    remote_code = os.path.join(out, REMOTE_CODE)
    if prefix:
        shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), REMOTE_CODE), remote_code)
    elif os.path.exists(remote_code):  # an earlier prefix export into the same folder
        os.remove(remote_code)
    return out


def write_processor(out, tokenizer, config):
    """The processor's files in `out`: the tokenizer with <image> added, its config and chat template, the image
    processor's; returns the image token's id."""
    image_token_id = add_image_token(tokenizer, config.language.vocab_size)
    tokenizer.save(out)
    write_json(os.path.join(out, "tokenizer_config.json"), tokenizer_config(tokenizer))
    write_json(os.path.join(out, "processor_config.json"), processor_config(config.vision))
    write_json(os.path.join(out, "preprocessor_config.json"), image_processor_config(config.vision))  # transformers 4
    write_text(os.path.join(out, "chat_template.jinja"), CHAT_TEMPLATE)
    return image_token_id


def write_json(path, content):
    write_text(path, json.dumps(content, indent=2) + "\n")


def write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def push(folder, repo_id, private):
    """Upload the folder to the Hub repo `repo_id` (created if missing); returns the commit's URL."""
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="vlm-align export.py")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=checkpoint_folder, default="out/stage3",
                        help="our checkpoint, or a training run's out_dir (its newest)")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="the weights' dtype in the folder")
    parser.add_argument("--push", metavar="OWNER/NAME", help="also upload the folder to this Hub model repo")
    parser.add_argument("--private", action="store_true", help="with --push: create the repo private")
    args = parser.parse_args(argv)
    if args.private and not args.push:
        parser.error("--private needs --push")
    return args


def main(argv=None):
    args = parse_args(argv)
    folder = export(args.checkpoint, args.out, args.dtype)
    print(f"wrote {folder}")
    if args.push:
        print(f"uploaded: {push(folder, args.push, args.private)}")
    return folder


if __name__ == "__main__":
    main()

"""The vision-language model of the paper (section 3.1, Fig. 2), in plain PyTorch.

    image -> SigLIP -> projector (Linear, GELU, Linear) -> image tokens --+
                                                                          +--> Qwen2 decoder -> next-token loss on text
    text  -> Qwen2 token embedding -------------------------------------> text tokens --+

The file reads top to bottom: the SigLIP vision encoder, the Qwen2 language model, loading of the official
safetensors, then the VLM that joins them: Algorithms 1 and 2 with the loss of eq. 1, and generation (whose
greedy and beam search are in decoding.py). Attention is SDPA under the dense masks of masks.py and the loss
is F.cross_entropy on the logits of every position: the reference computation, which the tests compare
against. fast_path.py computes the same faster on a GPU (train.py's `fast_path` setting).
"""
import json
import os
import re
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

import masks
from decoding import Decoder, KVCache, beam_search, greedy

IGNORE_INDEX = -100  # label of a token that carries no loss (PyTorch's cross_entropy default ignore_index)


def attend(q, k, v, mask):
    """Scaled dot-product attention of q [B,H,Q,hd] over k, v [B,Hkv,K,hd] (Hkv divides H: GQA). `mask`: None,
    every token sees every token (SigLIP), or boolean [B,1,Q,K], True where a query may attend to a key
    (masks.attention_mask). The fast path hands a mask object instead, which runs its own kernels."""
    if mask is not None and not isinstance(mask, torch.Tensor):
        return mask.attend(q, k, v)  # fast_path.PrefixBlocks or fast_path.FlexMask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


def shared_input_linear(x, *layers):
    """x through several nn.Linear layers as one matmul over their stacked weights (q, k and v; SwiGLU's gate and
    up): one wide matmul keeps the GPU busy where Qwen2's 128-wide k and v alone would not."""
    weight = torch.cat([layer.weight for layer in layers])
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    return F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)


# -----------------------------------------------------------------------------
# SigLIP vision encoder (the so400m tower: 27 pre-LN blocks of width 1152 over a 16x16 grid of 14x14-pixel patches)

@dataclass
class SigLIPConfig:
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-6


class SigLIPAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        B, N, D = x.shape
        qkv = shared_input_linear(x, self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (y.view(B, N, self.n_head, -1).transpose(1, 2) for y in qkv)
        y = attend(q, k, v, None)  # every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(B, N, D))


class SigLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SigLIPBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SigLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SigLIPMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SigLIP(nn.Module):
    """pixel_values [B,3,H,W] in [-1,1] -> one feature per patch [B, (H/p)*(W/p), width]. No CLS token."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(self.n_patches, cfg.hidden_size)
        self.layers = nn.ModuleList(SigLIPBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, pixel_values, feature_layer=-1):
        """-1: the last layer's output through post_layernorm (transformers' last_hidden_state); -k: the output of
        the k-th layer from the end, without the norm (transformers' hidden_states[-k]): later layers do not run."""
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2) + self.position_embedding.weight
        for layer in self.layers[:self.layers_run(feature_layer)]:
            x = checkpoint(layer, x, use_reentrant=False) if self.gradient_checkpointing and x.requires_grad else layer(x)
        return self.post_layernorm(x) if feature_layer == -1 else x

    def layers_run(self, feature_layer):
        """How many layers run for the features of `feature_layer` (forward)."""
        if not -len(self.layers) <= feature_layer <= -1:
            raise ValueError(f"vision_feature_layer {feature_layer}: from -1 (the last layer, normed) to "
                             f"-{len(self.layers)} (the first)")
        return len(self.layers) + 1 + feature_layer if feature_layer < -1 else len(self.layers)

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32):
        folder = resolve(name_or_path)
        config = read_json(os.path.join(folder, "config.json"))
        model = unloaded(cls, siglip_config(config, folder))
        # the Hub's file holds both towers under "vision_model."; a lone tower saved by transformers 4 too, not by 5
        prefix = "vision_model." if has_tensor(folder, "vision_model.post_layernorm.weight") else ""
        state = read_safetensors(folder, prefix=prefix, skip=(prefix + "head.",))  # the pooling head is unused
        load_state(model, {n.removeprefix(prefix): t for n, t in state.items()}, rename=siglip_name, source=folder, dtype=dtype)
        return model


# -----------------------------------------------------------------------------
# Qwen2 decoder (Qwen2.5-0.5B: 24 blocks of width 896, GQA 14 query / 2 key-value heads, RoPE, RMSNorm, SwiGLU)

@dataclass
class Qwen2Config:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 and scale after casting back, as Qwen2 was trained
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(position_ids, head_dim, theta):
    """cos and sin [B, 1, T, head_dim] for rotary position embedding, computed in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    angles = position_ids[..., None].float() * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # Qwen2 rotates the two halves of each head (not interleaved pairs)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Qwen2Attention(nn.Module):
    def __init__(self, cfg, layer_index):
        super().__init__()
        self.layer_index = layer_index
        self.n_head, self.n_kv_head = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        q, k, v = shared_input_linear(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_index, k, v)
        y = attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = shared_input_linear(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class Qwen2Block(nn.Module):
    def __init__(self, cfg, layer_index):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen2Attention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen2MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False

    def rope(self, position_ids):
        """RoPE's cos and sin tables for these positions [B, T]."""
        return rope_tables(position_ids, self.config.hidden_size // self.config.num_attention_heads, self.config.rope_theta)

    def hidden_states(self, x, mask, rope, cache=None):
        """The final-norm hidden states [B,T,D] of the input embeddings x [B,T,D] under `mask` (see attend)."""
        cos, sin = rope
        for layer in self.layers:
            if self.gradient_checkpointing and x.requires_grad:  # a backward pass will run through, frozen or not
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.norm(x)

    def forward(self, input_ids, mask=None, position_ids=None, cache=None):
        """Logits [B,T,vocab] of the language model alone: causal, positions 0..T-1, unless given."""
        B, T = input_ids.shape
        if cache is not None and (position_ids is None or mask is None):
            raise ValueError("with a cache, give position_ids and mask: the defaults fit a sequence without cached tokens")
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        if mask is None:
            mask = masks.causal(T, input_ids.device)[None, None]
        return self.lm_head(self.hidden_states(self.embed_tokens(input_ids), mask, self.rope(position_ids), cache))

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32):
        folder = resolve(name_or_path)
        cfg = qwen2_config(read_json(os.path.join(folder, "config.json")), folder)
        model = unloaded(cls, cfg)
        state = read_safetensors(folder)
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # some tied checkpoints still store the shared matrix twice
        load_state(model, state, rename=qwen2_name, source=folder, dtype=dtype)
        return model


# -----------------------------------------------------------------------------
# Loading the official checkpoints: a local folder or a Hub repo id, config.json + safetensors, strictly

HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]


def resolve(name_or_path):
    """A checkpoint's folder: a local folder, or a Hub repo id of which only the files we read are fetched."""
    if os.path.isfile(name_or_path):
        raise ValueError(f"{name_or_path} is a file; pass the folder that holds config.json and the safetensors")
    return local_or_hub(name_or_path, allow_patterns=HUB_FILES)


def local_or_hub(path_or_repo, allow_patterns, repo_type="model"):
    """A local folder as is; a Hub repo id ("owner/name") -> the folder of a download of only the files
    matching allow_patterns. A path that cannot be a repo id, or whose first folder exists here (data/recap
    where data/ReCap was meant), is a local folder that does not exist: say so, rather than ask the Hub."""
    if os.path.isdir(path_or_repo):
        return path_or_repo
    path_or_repo = str(path_or_repo)
    if not re.fullmatch(r"\w[\w.-]*/[\w.-]+", path_or_repo) or os.path.isdir(path_or_repo.split("/")[0]):
        raise FileNotFoundError(f"{path_or_repo}: no such folder (a Hub repo id is owner/name, where no folder "
                                "owner/ is here)")
    from huggingface_hub import snapshot_download
    return snapshot_download(path_or_repo, repo_type=repo_type, allow_patterns=allow_patterns)


def read_json(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not JSON: {error}") from error


def safetensors_files(folder):
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        return sorted(set(read_json(index)["weight_map"].values()))
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return ["model.safetensors"]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")


def open_safetensors(path):
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as error:  # a truncated file (a copy cut short, a full disk) or not safetensors at all
        raise ValueError(f"{path} is damaged or not a safetensors file: {error}") from error


def read_safetensors(folder, prefix="", skip=()):
    """All tensors whose name starts with `prefix`, but for those starting with a `skip` entry."""
    state = {}
    for file in safetensors_files(folder):
        with open_safetensors(os.path.join(folder, file)) as f:
            state.update({n: f.get_tensor(n) for n in f.keys() if n.startswith(prefix) and not n.startswith(skip)})
    return state


def unloaded(cls, *args):
    """`cls(*args)` with its tensors on the meta device: shapes only, no memory and no random initialisation
    (seconds at full size), for load_state to fill with the checkpoint's tensors."""
    with torch.device("meta"):
        return cls(*args)


def load_state(model, state, rename, source, dtype):
    """Put checkpoint tensors into `model` (built by `unloaded`, or an initialised one); any missing, unexpected
    or wrongly shaped tensor is an error."""
    ours, other_names = model.state_dict(), aliases(model)
    state = {rename(name): tensor for name, tensor in state.items()}
    missing = [n for n in ours if n not in state and not any(alias in state for alias in other_names.get(n, ()))]
    unexpected = [n for n in state if n not in ours]
    problems = [f"missing tensor {n}" for n in missing] + [f"unexpected tensor {n}" for n in unexpected]
    problems += [f"tensors {n} and {alias} differ, but are one parameter (tied)" for n in state
                 for alias in other_names.get(n, ())
                 if alias in state and n < alias and not torch.equal(state[n], state[alias])]
    problems += [f"tensor {n} has shape {tuple(t.shape)}, expected {tuple(ours[n].shape)}"
                 for n, t in state.items() if n in ours and t.shape != ours[n].shape]
    if problems:
        raise ValueError(f"cannot load {source} into {type(model).__name__}: " + "; ".join(problems[:10])
                         + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))
    model.load_state_dict(state, strict=False, assign=True)  # the loaded tensors become the parameters
    for name in state:  # which replaced one name of a tied parameter: its other names take the loaded tensor too
        for other in other_names.get(name, ()):
            module, _, leaf = other.rpartition(".")
            setattr(model.get_submodule(module), leaf, model.get_parameter(name))
    model.to(dtype)


def aliases(model):
    """Each tied parameter's other names (the tied output layer is the token embedding)."""
    names = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(parameter, []).append(name)
    return {name: [other for other in group if other != name] for group in names.values() for name in group}


def has_tensor(folder, name):
    for file in safetensors_files(folder):
        with open_safetensors(os.path.join(folder, file)) as f:
            if name in f.keys():
                return True
    return False


def siglip_name(name):
    name = name.replace("embeddings.patch_embedding", "patch_embedding")
    name = name.replace("embeddings.position_embedding", "position_embedding")
    return name.replace("encoder.layers.", "layers.")


def qwen2_name(name):
    return name.removeprefix("model.")


def pick(cls, values):
    """The dataclass `cls` from those entries of `values` it declares; the rest keep their defaults."""
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def siglip_config(config, source):
    # the Hub's SigLIP config.json holds both towers and spells out only what differs from the defaults
    if config.get("model_type") == "siglip":
        config = config.get("vision_config", {})
    elif config.get("model_type") != "siglip_vision_model":
        raise ValueError(f"{source} holds a {config.get('model_type')!r} model, not SigLIP (model_type 'siglip')")
    act = config.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        raise ValueError(f"{source}: SigLIP with hidden_act {act!r} is not supported (expected the tanh GELU)")
    defaults = dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                    num_hidden_layers=12, num_attention_heads=12, layer_norm_eps=1e-6, num_channels=3)
    return pick(SigLIPConfig, {**defaults, **config})


def qwen2_config(config, source):
    if config.get("model_type") != "qwen2":
        raise ValueError(f"{source} holds a {config.get('model_type')!r} model, not Qwen2 (model_type 'qwen2')")
    if config.get("use_sliding_window"):
        raise ValueError(f"{source}: sliding-window attention is not implemented")
    rope = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}  # old and new names
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{source}: RoPE scaling {rope_type!r} is not implemented, only plain RoPE")
    values = dict(config)
    values["rope_theta"] = config.get("rope_theta") or rope.get("rope_theta", 10000.0)  # transformers' default
    if "tie_word_embeddings" not in config:  # a config silent on it: a checkpoint without lm_head.weight is tied
        values["tie_word_embeddings"] = not has_tensor(source, "lm_head.weight")
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    if head_dim * config["num_attention_heads"] != config["hidden_size"]:
        raise ValueError(f"{source}: head_dim {head_dim} x {config['num_attention_heads']} heads != hidden_size")
    return pick(Qwen2Config, values)


# -----------------------------------------------------------------------------
# The vision-language model (paper 3.1, Algorithms 1 and 2)

@dataclass
class VLMConfig:
    vision: SigLIPConfig
    language: Qwen2Config
    # ours: LLaVA-OneVision's mlp2x_gelu at Qwen2.5-0.5B's width, 1.84M parameters; the paper's Table 4 says 18M,
    # which a 2-layer MLP from 1152 to 896 reaches only with a hidden width near 8,800 (the paper gives none)
    projector_hidden: int = 896
    # LLaVA-OneVision's image features, which the paper follows: layer 26 of so400m's 27, without the final norm
    vision_feature_layer: int = -2
    mask_kind: str = "prefix"  # the mask generation decodes under: training's (3.2), or prefix after stage 0


class Projector(nn.Module):
    """Maps vision features into the language model's embedding space (paper 3.1)."""

    def __init__(self, vision_width, hidden, language_width):
        super().__init__()
        self.fc1 = nn.Linear(vision_width, hidden)
        self.fc2 = nn.Linear(hidden, language_width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class VLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vision = SigLIP(config.vision)
        self.projector = Projector(config.vision.hidden_size, config.projector_hidden, config.language.hidden_size)
        self.language = Qwen2(config.language)
        self.n_image_tokens = self.vision.n_patches
        self.vision.layers_run(config.vision_feature_layer)  # a feature layer the encoder has
        self.fast_path = None  # a fast_path.FastPath after fast_path.use_fast_path(model): the same, faster

    def forward(self, pixel_values, input_ids, labels, document, mask_kind="prefix", noise_prob=0.0, noise_token_id=None,
                generator=None, label_positions=None):
        """The mean next-token cross-entropy over the labelled text (eq. 1): Algorithm 2, or Algorithm 1 under the
        bidirectional mask with noise_prob > 0 (stage 0; `generator` draws the noise). A batch is rows of
        [image | text] documents (data.collate, data.pack_documents): input_ids, labels, document [R, L], each
        document's first n_image_tokens positions its image slots; pixel_values: one image per document, in row
        order. `label_positions` (counted by data.py on the host) spare the fast path a wait for the GPU."""
        if noise_prob > 0:  # Algorithm 1, line 3: the text inputs get noise, the labels stay clean
            text = (document >= 0) & ~masks.image_slots(document, self.n_image_tokens)
            input_ids = masks.add_noise(input_ids, text, noise_prob, noise_token_id, self.config.language.vocab_size,
                                        generator)
        hidden = self.hidden_states(self.image_tokens(pixel_values), input_ids, document, mask_kind,
                                    labelled=labels != IGNORE_INDEX)  # where prefix_prompt's prompt ends
        if self.fast_path is not None:  # the output layer only where a label is, a chunk at a time
            return self.fast_path.next_token_loss(hidden, labels, label_positions, self.language.lm_head.weight)
        logits = self.language.lm_head(hidden).float()
        # position t predicts the token at t + 1: the last image token predicts the first text token. Image slots
        # carry no label, so a packed document's last token predicts nothing of the next document.
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)

    def image_tokens(self, pixel_values):
        """V <- projector(vision(image)) (section 3.1): the vision features of config.vision_feature_layer."""
        return self.projector(self.vision(pixel_values, self.config.vision_feature_layer))

    def unused_parameters(self):
        """The vision encoder's parts after the feature layer: never run, so never trained."""
        unused = list(self.vision.layers[self.vision.layers_run(self.config.vision_feature_layer):])
        if self.config.vision_feature_layer != -1:
            unused.append(self.vision.post_layernorm)
        return [p for module in unused for p in module.parameters()]

    def hidden_states(self, image_tokens, input_ids, document, mask_kind, cache=None, labelled=None):
        """Algorithm 2's forward pass: the language model over each document's [image tokens | text tokens] under
        the stage's mask (sections 3.1, 3.2); the final-norm hidden states [R, L, D]. `labelled` marks the
        answer tokens, for prefix_prompt's mask (None: a prompt, to be answered)."""
        text_tokens = self.language.embed_tokens(input_ids)
        slots = masks.image_slots(document, self.n_image_tokens)
        sequence = place_images(text_tokens, image_tokens, slots)                    # L <- concat(V, T)
        rope = self.language.rope(masks.document_positions(document))
        if self.fast_path is None or cache is not None:
            mask = masks.attention_mask(mask_kind, self.n_image_tokens, document, labelled)  # update_attention
        else:  # the same mask in the forms the fast kernels take (fast_path.py)
            packed = len(image_tokens) > len(document)
            mask, rope = self.fast_path.inputs(mask_kind, self.n_image_tokens, document, rope, packed, labelled)
        return self.language.hidden_states(sequence, mask, rope, cache)

    @torch.no_grad()
    def generate(self, pixel_values, input_ids, text_mask, max_new_tokens=30, num_beams=1,
                 eos_ids=(151645, 151643), mask_kind=None, length_penalty=1.0, on_token=None):
        """Each prompt's new tokens, up to (not including) an end token (`eos_ids`: <|im_end|>, <|endoftext|>).
        The prompts [B, T] may be padded on either side (text_mask: True on real tokens) and attend under
        `mask_kind` (default: config.mask_kind, the training mask). `on_token(tokens [B])` is called after each
        greedy step (-1 for a sample that has ended)."""
        image_tokens = self.image_tokens(pixel_values)
        if num_beams > 1:
            image_tokens, input_ids, text_mask = (t.repeat_interleave(num_beams, dim=0)
                                                  for t in (image_tokens, input_ids, text_mask))
        input_ids, document = prompt_rows(input_ids, text_mask, self.n_image_tokens)
        cache = KVCache()
        hidden = self.hidden_states(image_tokens, input_ids, document, mask_kind or self.config.mask_kind, cache)
        logits = self.language.lm_head(hidden[:, -1]).float()  # the pads lead the rows: the last token is real
        step = Decoder(self.language, cache, document >= 0, eos_ids)
        if num_beams == 1:
            return greedy(step, logits, max_new_tokens, on_token)
        return beam_search(step, logits, max_new_tokens, num_beams, length_penalty)

    @classmethod
    def from_pretrained(cls, vision, language, projector_hidden=896, vision_feature_layer=-2, dtype=torch.float32):
        """The paper's starting point: pretrained SigLIP and Qwen2 joined by a freshly initialised projector."""
        vision_model = SigLIP.from_pretrained(vision, dtype)
        language_model = Qwen2.from_pretrained(language, dtype)
        config = VLMConfig(vision_model.config, language_model.config, projector_hidden, vision_feature_layer)
        model = unloaded(cls, config)
        model.vision, model.language = vision_model, language_model
        model.projector = Projector(vision_model.config.hidden_size, projector_hidden, language_model.config.hidden_size)
        return model.to(dtype)

    def save(self, folder, tokenizer=None):
        """model.safetensors + config.json (+ tokenizer.json), each written under a temporary name and renamed."""
        os.makedirs(folder, exist_ok=True)
        state = {n: t.detach().contiguous() for n, t in self.state_dict().items()}
        if self.config.language.tie_word_embeddings:
            del state["language.lm_head.weight"]  # the same matrix as the token embedding
        save_file(state, os.path.join(folder, "model.safetensors.tmp"), metadata={"format": "pt"})
        os.replace(os.path.join(folder, "model.safetensors.tmp"), os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "config.json.tmp"), "w") as f:
            json.dump({"architecture": VLM_ARCHITECTURE, **asdict(self.config)}, f, indent=2)
        os.replace(os.path.join(folder, "config.json.tmp"), os.path.join(folder, "config.json"))
        if tokenizer is not None:
            tokenizer.save(folder)

    @classmethod
    def load(cls, folder, dtype=torch.float32):
        config = read_json(os.path.join(folder, "config.json"))
        if config.get("architecture") != VLM_ARCHITECTURE:
            raise ValueError(f"{folder} is not a checkpoint of this project (config.json architecture "
                             f"{config.get('architecture')!r}, expected {VLM_ARCHITECTURE!r})")
        missing = [field.name for field in fields(VLMConfig) if field.name not in config]
        if missing:
            raise ValueError(f"{folder}/config.json lacks {missing}: written by an older version of this code")
        sizes = SigLIPConfig(**config["vision"]), Qwen2Config(**config["language"]), config["projector_hidden"]
        model = unloaded(cls, VLMConfig(*sizes, config["vision_feature_layer"], config["mask_kind"]))
        load_state(model, read_safetensors(folder), rename=lambda n: n, source=folder, dtype=dtype)
        return model

    def parameter_groups(self):
        return {"vision": self.vision, "projector": self.projector, "language": self.language}

    def training_flops(self, n_text_tokens, n_label_tokens, trainable):
        """Matrix-multiply FLOPs of one training sample (2 per multiply-add), for MFU. A layer costs its forward
        once, once more for its weights' gradients if it trains, once more for its input's gradient if anything
        before it trains; attention's two products (the full S x S scores) three times their forward where
        gradients cross them, frozen or not. tests/test_model.py checks it against torch's FLOP counter."""
        v, l, hidden = self.config.vision, self.config.language, self.config.projector_hidden
        n, d = self.n_image_tokens, v.hidden_size
        vision_layers = self.vision.layers_run(self.config.vision_feature_layer)
        s, h = n + n_text_tokens, l.hidden_size
        kv = l.num_key_value_heads * h // l.num_attention_heads
        vision, projector, language = (name in trainable for name in ("vision", "projector", "language"))
        layer = lambda forward, weights_train, input_needs_gradient: forward * (1 + weights_train + input_needs_gradient)
        attention = lambda forward, gradients_cross: forward * (3 if gradients_cross else 1)
        return (layer(2 * n * v.num_channels * v.patch_size ** 2 * d, vision, False)  # the patch embedding
                + layer(vision_layers * 2 * n * (4 * d * d + 2 * d * v.intermediate_size), vision, vision)
                + attention(vision_layers * 4 * n * n * d, vision)
                + layer(2 * n * d * hidden, projector, vision)
                + layer(2 * n * hidden * h, projector, vision or projector)
                + layer(l.num_hidden_layers * 2 * s * (2 * h * h + 2 * h * kv + 3 * h * l.intermediate_size),
                        language, bool(trainable))
                + attention(l.num_hidden_layers * 4 * s * s * h, bool(trainable))
                + layer(2 * n_label_tokens * h * l.vocab_size, language, bool(trainable)))  # logits only at labels


VLM_ARCHITECTURE = "siglip-projector-qwen2"


def place_images(text_tokens, image_tokens, image_slots):
    """The rows' embeddings [R, L, D] with each document's image tokens (image_tokens [N, n, D], in row order)
    in its image slots (image_slots [R, L])."""
    # a stable sort of "is text" lists the slots' flat positions first, in row order: unlike nonzero(), the host
    # does not wait for the GPU
    index = torch.argsort((~image_slots).flatten().int(), stable=True)[:image_tokens.shape[0] * image_tokens.shape[1]]
    flat = text_tokens.flatten(0, 1).index_copy(0, index, image_tokens.flatten(0, 1).to(text_tokens.dtype))
    return flat.view_as(text_tokens)


def find_label_positions(labels):
    """The entries of labels.flatten() that carry a label (data.py counts them for each batch on the host)."""
    return (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)


def prompt_rows(input_ids, text_mask, n_image_tokens):
    """Prompts [B, T] padded on either side -> rows [pads | image slots | prompt] as training lays out a
    document, and their `document` (-1 on the pads): the pads go first, so every row ends on its last token."""
    image = torch.ones_like(text_mask[:, :1], dtype=torch.bool).expand(-1, n_image_tokens)
    real = torch.cat([image, text_mask.bool()], dim=1)
    order = torch.argsort(real.int(), dim=1, stable=True)  # the pads first, the real tokens in their order
    ids = torch.cat([input_ids.new_zeros(len(input_ids), n_image_tokens), input_ids], dim=1).gather(1, order)
    return ids, torch.where(real.gather(1, order), 0, -1)

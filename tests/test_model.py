"""model.py against transformers, the reference implementation: random weights saved in the official layout,
loaded by our code, compared in fp32. Small configs over several seeds, and once at the full official sizes."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_qwen2, save_siglip
from model import VLM, Qwen2, SigLIP

torch.set_num_threads(2)


def max_diff(a, b):
    return (a - b).abs().max().item()


# --- SigLIP ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_siglip_matches_transformers(tmp_path, seed):
    reference = save_siglip(tmp_path, seed=seed)
    ours = SigLIP.from_pretrained(str(tmp_path)).eval()
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state
        got = ours(pixels)
    assert got.shape == (3, 16, 64)  # 4x4 patches, no CLS token
    assert max_diff(got, expected) < 1e-5, f"max abs diff {max_diff(got, expected):.2e}"


@pytest.mark.parametrize("feature_layer", [-1, -2, -3])
def test_siglip_feature_layers_match_transformers_hidden_states(tmp_path, feature_layer):
    """-1 is transformers' last_hidden_state (the last layer through post_layernorm); -k, for k > 1, is its
    hidden_states[-k], the k-th layer from the end without the norm: -2 is LLaVA-OneVision's image feature."""
    reference = save_siglip(tmp_path, num_hidden_layers=3)
    ours = SigLIP.from_pretrained(str(tmp_path)).eval()
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = reference(pixel_values=pixels, output_hidden_states=True)
        expected = out.last_hidden_state if feature_layer == -1 else out.hidden_states[feature_layer]
        got = ours(pixels, feature_layer)
    assert max_diff(got, expected) < 1e-5
    assert not torch.allclose(got, ours(pixels, -1 if feature_layer != -1 else -2))  # the layers do differ


def test_layers_after_the_feature_layer_do_not_run_and_do_not_train(tmp_path):
    """At -2 the last vision layer and the final norm never run: changing them changes nothing, train.py
    freezes them (no gradient ever reaches them, and DDP would wait for one), and the FLOP count leaves them out."""
    from test_train import tiny_setup
    _, _, model, _, optimizer = tiny_setup(vision_feature_layer=-2)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.image_tokens(pixels)
        model.vision.layers[-1].mlp.fc2.weight.add_(1.0)
        model.vision.post_layernorm.weight.add_(1.0)
        assert torch.equal(model.image_tokens(pixels), before)
    unused = {id(p) for p in model.unused_parameters()}
    assert unused == {id(p) for p in [*model.vision.layers[-1].parameters(), *model.vision.post_layernorm.parameters()]}
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not unused & stepped and all(not p.requires_grad for p in model.unused_parameters())
    trainable = ["vision", "projector", "language"]
    at_layer_minus_2 = model.training_flops(40, 12, trainable)
    model.config.vision_feature_layer = -1
    assert model.training_flops(40, 12, trainable) > at_layer_minus_2


def test_a_feature_layer_the_encoder_lacks_is_refused():
    from model import Qwen2Config, SigLIPConfig, VLMConfig
    with pytest.raises(ValueError, match="vision_feature_layer -3: from -1 .* to -2"):
        VLM(VLMConfig(SigLIPConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=32, num_attention_heads=2),
                      Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1), 32, vision_feature_layer=-3))


def features_diff(ours, reference, size=56):
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return max_diff(ours(pixels), reference(pixel_values=pixels).last_hidden_state)


def test_siglip_file_with_text_tower_loads_only_the_vision_tower(tmp_path):
    reference = save_siglip(tmp_path, with_text_tower=True)
    names = load_file(tmp_path / "model.safetensors").keys()
    assert any(n.startswith("text_model.") for n in names) and "logit_scale" in names
    diff = features_diff(SigLIP.from_pretrained(str(tmp_path)).eval(), reference)
    assert diff < 1e-5, f"max abs diff {diff:.2e}"


def test_siglip_hub_style_terse_config(tmp_path):
    """The Hub's so400m config.json names only what differs from the defaults: eps and activation are implied."""
    reference = save_siglip(tmp_path, with_text_tower=True)
    terse = {"model_type": "siglip", "architectures": ["SiglipModel"], "text_config": {"hidden_size": 32},
             "vision_config": {"hidden_size": 64, "image_size": 56, "intermediate_size": 112, "model_type": "siglip_vision_model",
                               "num_attention_heads": 4, "num_hidden_layers": 2, "patch_size": 14}}
    (tmp_path / "config.json").write_text(json.dumps(terse))
    ours = SigLIP.from_pretrained(str(tmp_path)).eval()
    assert ours.config.layer_norm_eps == 1e-6
    diff = features_diff(ours, reference)
    assert diff < 1e-5, f"max abs diff {diff:.2e}"


def test_siglip_lone_tower_saved_by_transformers_4_keeps_its_prefix(tmp_path):
    """transformers 4 saved a lone SiglipVisionModel with "vision_model." before every tensor name; 5 does not."""
    reference = save_siglip(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({f"vision_model.{name}": tensor for name, tensor in state.items()}, tmp_path / "model.safetensors")
    diff = features_diff(SigLIP.from_pretrained(str(tmp_path)).eval(), reference)
    assert diff < 1e-5, f"max abs diff {diff:.2e}"


def test_siglip_other_resolution(tmp_path):
    """Image and patch size come from the config, so e.g. a 384px checkpoint loads too."""
    reference = save_siglip(tmp_path, image_size=48, patch_size=16)
    ours = SigLIP.from_pretrained(str(tmp_path)).eval()
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        got, expected = ours(pixels), reference(pixel_values=pixels).last_hidden_state
    assert got.shape == (2, 9, 64)
    assert max_diff(got, expected) < 1e-5


# --- Qwen2 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qwen2_logits_match_transformers(tmp_path, seed):
    reference = save_qwen2(tmp_path, seed=seed)
    ours = Qwen2.from_pretrained(str(tmp_path)).eval()
    assert ours.lm_head.weight is ours.embed_tokens.weight  # tied, as stored: one matrix, loaded once
    ids = torch.randint(0, 300, (3, 11))
    with torch.no_grad():
        diff = max_diff(ours(ids), reference(ids).logits)
    assert diff < 1e-4, f"max abs diff {diff:.2e}"


def test_qwen2_left_padding_matches_transformers(tmp_path):
    """With left padding, transformers shifts positions past the pads; so do our position ids."""
    import masks
    reference = save_qwen2(tmp_path)
    ours = Qwen2.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, 300, (2, 9))
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, :3] = False
    with torch.no_grad():
        expected = reference(ids, attention_mask=keep.long()).logits
        document = torch.where(keep, 0, -1)  # the pads lead the row, as generation lays out prompts
        got = ours(ids, mask=masks.attention_mask("causal", 0, document), position_ids=masks.document_positions(document))
    diff = max_diff(got[keep], expected[keep])
    assert diff < 1e-4, f"max abs diff over real tokens {diff:.2e}"


def test_qwen2_untied_and_sharded(tmp_path):
    reference = save_qwen2(tmp_path, tie=False, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = Qwen2.from_pretrained(str(tmp_path)).eval()
    assert ours.lm_head.weight is not ours.embed_tokens.weight
    diff = logits_diff(ours, reference)
    assert diff < 1e-4, f"max abs diff {diff:.2e}"


def rewrite_config(folder, drop=(), **values):
    """Edit a saved config.json into the shape of another one (an older Hub file, say)."""
    config = json.loads((folder / "config.json").read_text())
    for key in drop:
        config.pop(key, None)
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config))


def logits_diff(ours, reference, length=7):
    ids = torch.randint(0, 300, (2, length))
    with torch.no_grad():
        return max_diff(ours(ids), reference(ids).logits)


def test_qwen2_hub_style_config(tmp_path):
    """The Hub's Qwen2.5 config.json predates transformers 5: top-level rope_theta, torch_dtype, no sliding window."""
    reference = save_qwen2(tmp_path, rope_theta=10000.0)
    rewrite_config(tmp_path, drop=["rope_parameters", "tie_word_embeddings"],  # silent on tying: no lm_head.weight
                   rope_theta=10000.0, torch_dtype="bfloat16", sliding_window=32768, use_sliding_window=False)
    ours = Qwen2.from_pretrained(str(tmp_path)).eval()
    assert ours.config.rope_theta == 10000.0 and ours.config.tie_word_embeddings
    diff = logits_diff(ours, reference)
    assert diff < 1e-4, f"max abs diff {diff:.2e}"


def test_qwen2_config_without_rope_theta_gets_transformers_default(tmp_path):
    reference = save_qwen2(tmp_path, rope_theta=10000.0)
    rewrite_config(tmp_path, drop=["rope_parameters", "rope_theta"])
    ours = Qwen2.from_pretrained(str(tmp_path)).eval()
    diff = logits_diff(ours, reference, length=40)
    assert ours.config.rope_theta == 10000.0 and diff < 1e-4, f"max abs diff {diff:.2e}"


@pytest.mark.parametrize("rope", [{"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
                                  {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 1e6}])
def test_qwen2_with_rope_scaling_is_refused(tmp_path, rope):
    """Long-context RoPE scaling (YaRN, linear) changes every position's rotation: not silently ignored."""
    save_qwen2(tmp_path)
    rewrite_config(tmp_path, drop=["rope_parameters"], **rope)
    with pytest.raises(ValueError, match="RoPE scaling '(yarn|linear)' is not implemented"):
        Qwen2.from_pretrained(str(tmp_path))


def test_bf16_loading(tmp_path):
    save_qwen2(tmp_path)
    ours = Qwen2.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())


# --- strict loading -------------------------------------------------------------------------------

def test_missing_tensor_is_named(tmp_path):
    save_qwen2(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor layers\.1\.self_attn\.k_proj\.bias"):
        Qwen2.from_pretrained(str(tmp_path))


def test_wrong_shape_and_unexpected_tensor_are_named(tmp_path):
    save_siglip(tmp_path, with_text_tower=True)
    state = load_file(tmp_path / "model.safetensors")
    state["vision_model.post_layernorm.weight"] = torch.ones(65)
    state["vision_model.encoder.layers.9.mlp.fc1.weight"] = torch.ones(1)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as error:
        SigLIP.from_pretrained(str(tmp_path))
    assert "post_layernorm.weight has shape (65,)" in str(error.value)
    assert "unexpected tensor layers.9.mlp.fc1.weight" in str(error.value)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    save_qwen2(tmp_path / "qwen")
    save_siglip(tmp_path / "siglip")
    with pytest.raises(ValueError, match="not SigLIP"):
        SigLIP.from_pretrained(str(tmp_path / "qwen"))
    with pytest.raises(ValueError, match="not Qwen2"):
        Qwen2.from_pretrained(str(tmp_path / "siglip"))
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        VLM.load(str(tmp_path / "qwen"))


def test_a_truncated_weights_file_is_named(tmp_path):
    """A copy cut short (or a full disk) leaves a safetensors file whose header promises more than it holds:
    the error names the file, for our checkpoints (sample.py, eval.py, --init_from) and the backbones alike."""
    save_qwen2(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{weights} is damaged or not a safetensors file"):
        Qwen2.from_pretrained(str(tmp_path))


def test_missing_weights_file_is_named(tmp_path):
    save_qwen2(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Qwen2.from_pretrained(str(tmp_path))


def test_a_tied_matrix_stored_twice_must_be_one_matrix(tmp_path):
    """Our checkpoints store Qwen2.5-0.5B's tied output layer once, as the token embedding. A file that stores it
    under both names loads only where the two are equal: two different matrices cannot be one parameter."""
    from model import Qwen2Config, SigLIPConfig, VLMConfig
    config = VLMConfig(SigLIPConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2),
                       Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True), 32)
    VLM(config).save(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["language.lm_head.weight"] = state["language.embed_tokens.weight"].clone()
    save_file(state, tmp_path / "model.safetensors")
    assert torch.equal(VLM.load(str(tmp_path)).language.lm_head.weight, state["language.embed_tokens.weight"])
    state["language.lm_head.weight"] = torch.zeros_like(state["language.lm_head.weight"])
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="language.embed_tokens.weight and language.lm_head.weight differ, but are one"):
        VLM.load(str(tmp_path))


# --- full official sizes, once ----------------------------------------------------------------------

def test_full_size_siglip_so400m_matches_transformers(tmp_path):
    reference = save_siglip(tmp_path, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                            num_attention_heads=16, image_size=224, patch_size=14)
    ours = SigLIP.from_pretrained(str(tmp_path)).eval()
    pixels = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        out = reference(pixel_values=pixels, output_hidden_states=True)
        for feature_layer, expected in [(-1, out.last_hidden_state), (-2, out.hidden_states[-2])]:  # LLaVA-OneVision's
            got = ours(pixels, feature_layer)
            assert got.shape == (2, 256, 1152)
            diff = max_diff(got, expected)
            print(f"SigLIP so400m full size, feature layer {feature_layer}: max abs diff {diff:.2e}")
            assert diff < 1e-4, f"max abs diff {diff:.2e}"


def test_full_size_qwen25_05b_matches_transformers(tmp_path):
    reference = save_qwen2(tmp_path, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768)
    ours = Qwen2.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, 151936, (2, 24))
    with torch.no_grad():
        got, expected = ours(ids), reference(ids).logits
    diff = max_diff(got, expected)
    print(f"Qwen2.5-0.5B full size: max abs diff {diff:.2e}")
    assert diff < 1e-3, f"max abs diff {diff:.2e}"


# --- the FLOP count behind MFU ----------------------------------------------------------------------

@pytest.mark.parametrize("trainable", [["projector"], ["vision", "projector", "language"], ["projector", "language"],
                                       ["vision"]], ids=["stages 0-1", "stages 2-3", "vision frozen", "vision only"])
def test_training_flops_equal_torchs_flop_counter(trainable):
    """bench.py's and train.py's MFU divide VLM.training_flops by the time: it must be the matmul work the step
    does. torch's FlopCounterMode counts each matmul of a forward and backward pass as it runs (attention on
    SDPA's math kernel, which it sees as matmuls); labels on the last 12 of 40 text tokens. The loss is the fast
    path's, whose logits exist only at the labels, as training_flops counts them; attention is the dense mask's,
    the full S x S scores."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import data
    import fast_path
    import masks
    from model import IGNORE_INDEX, Qwen2Config, SigLIPConfig, VLMConfig

    class DenseMaskFastLoss(fast_path.FastPath):
        def inputs(self, mask_kind, n_image_tokens, document, rope, packed, labelled=None):
            return masks.attention_mask(mask_kind, n_image_tokens, document, labelled), rope
    torch.manual_seed(0)
    model = VLM(VLMConfig(SigLIPConfig(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4),
                          Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2), projector_hidden=48))
    for name, module in model.parameter_groups().items():
        module.requires_grad_(name in trainable)
    batch, text, labelled = 2, 40, 12
    ids = torch.randint(0, 512, (batch, text))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -labelled:] = ids[:, -labelled:]
    model.fast_path = DenseMaskFastLoss()
    rows = data.collate([{"pixel_values": torch.randn(3, 56, 56), "input_ids": i, "labels": l} for i, l in zip(ids, labels)],
                        model.n_image_tokens, pad_id=0)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(**rows).backward()
    assert model.training_flops(text, labelled, trainable) * batch == counter.get_total_flops()

"""transformers' Llava under the paper's prefix mask (section 3.2, Fig. 3b): the remote code of an exported model.

export.py copies this file into the folder it writes; `AutoModelForImageTextToText.from_pretrained(folder,
trust_remote_code=True)` loads it. The weights and everything else are Llava's: the only difference from
LlavaForConditionalGeneration is the mask. Image tokens (config.image_token_id) attend to each other both ways;
text stays causal and sees every image token before it. Without it (loaded without trust_remote_code) the same
folder is plain, causal Llava, which silently computes a different model from the one trained.

This file runs in the user's transformers (written against 5.24); the rest of vlm-align never imports it.
"""
import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaModel, LlavaPreTrainedModel
from transformers.masking_utils import create_causal_mask


def image_blocks(input_ids, image_token_id, past_length=0):
    """The block of every position of the sequence so far [B, past_length + T]: 0 on image tokens, which see each
    other both ways (transformers' block_sequence_ids rule, as Gemma 3's), -1 on text (causal). Cached positions
    are -1: the tokens now read are the only queries."""
    blocks = torch.where(input_ids == image_token_id, 0, -1)
    return nn.functional.pad(blocks, (past_length, 0), value=-1)


class PrefixLlavaModel(LlavaModel):
    """LlavaModel whose language model reads [image | text] under the prefix mask."""

    _supports_flash_attn = False  # flash-attention 2 keeps only the padding of a mask, so the image block would be causal

    def prefix_masks(self, input_ids, attention_mask, cache):
        """The masks for the language model's layers (all full attention): causal, with the image tokens among
        `input_ids` unmasked to each other; `attention_mask` [B, past + T] hides padding. None when the input holds
        no image token: then plain causal, as Qwen2 builds it itself."""
        if input_ids is None or not (input_ids == self.config.image_token_id).any():
            return None
        past_length = cache.get_seq_length() if cache is not None else 0
        text_config = self.config.get_text_config()
        shape_only = torch.empty((*input_ids.shape, 0), dtype=self.dtype, device=input_ids.device)
        mask = create_causal_mask(config=text_config, inputs_embeds=shape_only, attention_mask=attention_mask,
                                  cache=cache, block_sequence_ids=image_blocks(input_ids, self.config.image_token_id,
                                                                               past_length))
        return {layer_type: mask for layer_type in set(text_config.layer_types)}

    def forward(self, input_ids=None, attention_mask=None, cache=None, **kwargs):
        already_built = isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.ndim == 4)
        if not already_built:
            attention_mask = self.prefix_masks(input_ids, attention_mask, cache) or attention_mask
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, cache=cache, **kwargs)


class PrefixLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LlavaForConditionalGeneration with PrefixLlavaModel inside: the same weights, the paper's mask."""

    _supports_flash_attn = False

    def __init__(self, config):
        LlavaPreTrainedModel.__init__(self, config)  # as LlavaForConditionalGeneration, with the prefix-mask model
        self.model = PrefixLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if isinstance(inputs.get("attention_mask"), dict):
            # with a static cache generate builds the masks ahead, causal: remake them with the image block unmasked
            prefix = self.model.prefix_masks(inputs.get("input_ids"), kwargs.get("attention_mask"), inputs.get("cache"))
            inputs["attention_mask"] = prefix or inputs["attention_mask"]
        return inputs

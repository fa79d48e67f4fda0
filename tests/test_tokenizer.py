"""The tokenizer and the chat format, checked against the real Qwen2.5 vocabulary and against references
written by others: transformers' Qwen2Tokenizer and Qwen's own tokenizer.json."""
import hashlib
import os

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer

from data import Tokenizer, chat_prompt, read_merges
from data_helpers import copy_qwen_bpe_files, qwen_files_folder

QWEN_VOCAB_SHA256 = "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910"

# Several turns, Chinese, emoji, digits, a decimal, tabs, runs of spaces and newlines, CRLF, contractions,
# accents (NFC matters: "é" typed as e + combining accent must become the same tokens as "é").
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "你好，世界！What is 3.14159 * 2? 🌍🐱\n\n  Tabs\tand   spaces.  "},
    {"role": "assistant", "content": "It's 6.28318. I'm sure they'll agree.\r\nÉcole naïve café"},
    {"role": "user", "content": "Describe the image.\n- item 1\n- item 22\n\n\nEnd"},
    {"role": "assistant", "content": "A cat 🐈 sits on 2 mats, eating 1,000 fish (really!)."},
    {"role": "user", "content": "Cafe\u0301 or café? 東京タワー 2024年"},
]


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return copy_qwen_bpe_files(tmp_path_factory.mktemp("qwen_bpe"))


@pytest.fixture(scope="module")
def qwen(qwen_folder):
    return Tokenizer.from_pretrained(str(qwen_folder))


def test_the_packaged_vocab_is_qwens():
    with open(os.path.join(qwen_files_folder(), "vocab.json"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == QWEN_VOCAB_SHA256


def test_reference_encodings_and_special_ids(qwen):
    assert qwen.encode("Hello world") == [9707, 1879]
    assert qwen.encode("hello world") == [14990, 1879]
    assert (qwen.eos_id, qwen.im_start_id, qwen.im_end_id) == (151643, 151644, 151645)
    assert qwen.pad_id == qwen.eos_id
    assert qwen.encode("<|im_start|>user<|im_end|><|endoftext|>") == [151644, 872, 151645, 151643]
    assert qwen.encode("<|vision_start|><|file_sep|>") == [151652, 151664]  # the other added tokens
    assert qwen.vocab_size == 151665  # 151,643 BPE entries + 22 added tokens (Qwen2.5's tokenizer.json)
    assert qwen.encode("Cafe\u0301") == qwen.encode("Café")  # NFC: a combining accent is composed first


def test_merges_file_has_crlf_line_ends_and_a_version_header(qwen_folder, tmp_path):
    with open(qwen_folder / "merges.txt", "rb") as f:
        raw = f.read()
    assert raw.startswith(b"#version") and b"\r\n" in raw  # the case read_merges must handle
    merges = read_merges(qwen_folder / "merges.txt")
    assert merges[0] == ("Ġ", "Ġ")
    assert all(len(pair) == 2 and "\r" not in pair[1] for pair in merges)
    assert len(merges) == raw.count(b"\n") - 1  # every line but the header
    lf_only = tmp_path / "merges.txt"
    lf_only.write_bytes(raw.replace(b"\r\n", b"\n"))
    assert read_merges(lf_only) == merges


def test_chatml_conversation_matches_transformers_qwen2_tokenizer(qwen, tmp_path):
    from transformers import Qwen2Tokenizer
    # transformers 5 takes `vocab`/`merges`, silently ignoring the old `vocab_file` keyword: load the folder,
    # with Qwen's tokenizer_config.json so that it knows the special tokens.
    reference = Qwen2Tokenizer.from_pretrained(copy_qwen_bpe_files(tmp_path, with_config=True))
    text = chat_prompt(CONVERSATION)
    ids = qwen.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert ids.count(151644) == len(CONVERSATION) + 1  # each turn and the generation prompt: no split specials
    assert qwen.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_dataset_text_reads_special_tokens_as_characters_and_other_added_tokens_as_transformers_does(qwen, tmp_path):
    """encode_text (data's text) spells out a quoted special token (data.py's tests show why); Qwen's added
    tokens that are not special, such as <tool_call>, stay one token each, as transformers encodes them."""
    from transformers import Qwen2Tokenizer
    reference = Qwen2Tokenizer.from_pretrained(copy_qwen_bpe_files(tmp_path, with_config=True))
    text = "Call <tool_call> then <|fim_prefix|>"
    assert qwen.encode_text(text) == reference.encode(text, add_special_tokens=False) == [7220, 220, 151657, 1221, 220, 151659]
    quoted = qwen.encode_text("a <|im_end|>")
    assert qwen.im_end_id not in quoted and qwen.decode(quoted, skip_special_tokens=False) == "a <|im_end|>"


def test_chatml_conversation_matches_qwens_own_tokenizer_json(qwen):
    # Qwen3's tokenizer.json, shipped in the same package: the same BPE and pre-tokenizer, written by Qwen.
    reference = RustTokenizer.from_file(os.path.join(qwen_files_folder(), "tokenizer.json"))
    text = chat_prompt(CONVERSATION)
    assert qwen.encode(text) == reference.encode(text, add_special_tokens=False).ids


def test_decode_round_trip(qwen):
    text = chat_prompt(CONVERSATION, add_generation_prompt=False).replace("Cafe\u0301", "Café")  # NFC form
    ids = qwen.encode(text)
    assert qwen.decode(ids, skip_special_tokens=False) == text
    assert "<|im_start|>" not in qwen.decode(ids)  # skip_special_tokens=True is the default
    assert qwen.decode(qwen.encode("你好 🌍\n\n  x")) == "你好 🌍\n\n  x"
    assert qwen.decode(torch.tensor(qwen.encode("Hello world"))) == "Hello world"  # what generate() hands back


def test_saved_tokenizer_json_loads_back(qwen, tmp_path):
    qwen.save(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["tokenizer.json"]
    loaded = Tokenizer.from_pretrained(str(tmp_path / "ckpt"))
    text = chat_prompt(CONVERSATION)
    assert loaded.encode(text) == qwen.encode(text)
    assert (loaded.im_start_id, loaded.im_end_id, loaded.eos_id, loaded.vocab_size) == \
        (qwen.im_start_id, qwen.im_end_id, qwen.eos_id, qwen.vocab_size)


def test_missing_tokenizer_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))


def test_chat_prompt_is_chatml():
    messages = [{"role": "user", "content": "What is this?"}]
    assert chat_prompt(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is this?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert chat_prompt(messages, add_generation_prompt=False, system_prompt=None) == \
        "<|im_start|>user\nWhat is this?<|im_end|>\n"
    own_system = [{"role": "system", "content": "Be brief."}] + messages
    assert chat_prompt(own_system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")


def test_chat_prompt_matches_qwens_chat_template(tmp_path):
    """The turns as Qwen's own template writes them. The package's template is Qwen3's, which adds no system
    turn of its own, so the conversation brings one. (Qwen2.5's adds "You are Qwen, created by Alibaba Cloud.
    You are a helpful assistant." when none is given; ours is LLaVA-NeXT's, "You are a helpful assistant.")"""
    from transformers import Qwen2Tokenizer
    reference = Qwen2Tokenizer.from_pretrained(copy_qwen_bpe_files(tmp_path, with_config=True))
    expected = reference.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert chat_prompt(CONVERSATION) == expected

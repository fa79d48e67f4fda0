"""Data, read top to bottom: 1. the tokenizer (Qwen2.5's byte-level BPE, built with `tokenizers`); 2. the chat
format (ChatML; LLaVA conversations -> (input_ids, labels)); 3. images (RGB, bicubic to the encoder's 224x224,
[-1, 1]: SigLIP's recipe); 4. sources (parquet shards of LLaVA-ReCap, LLaVA-NeXT-Data and PathVQA, LLaVA's JSON,
Karpathy caption splits; the demo's are in shapes.py); 5. a shuffled, sharded, resumable stream of batches."""
import glob
import io
import itertools
import json
import logging
import math
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from model import IGNORE_INDEX, find_label_positions, local_or_hub, read_json

logger = logging.getLogger(__name__)

# --- 1. Tokenizer -----------------------------------------------------------------------------------------
# Qwen2's pre-tokenizer (its tokenizer.json): words, single digits, punctuation and whitespace runs, then BPE
QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen's added tokens, ids 151643-151664 after the BPE entries. The first 14 are "special" (recognised in text,
# dropped by decode(skip_special_tokens=True)); the last 8 are recognised but kept, as in its tokenizer_config.json.
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                       "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_PLAIN_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                           "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
TOKENIZER_FILES = ["tokenizer.json", "vocab.json", "merges.txt"]


def read_merges(path):
    """merges.txt -> [(left, right), ...], without the `#version` header; CRLF line ends tolerated."""
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\r\n") for line in f]
    return [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]


def use_qwen_pipeline(tokenizer):
    """Qwen2's steps around BPE: NFC, the regex split, ByteLevel (bytes as characters: any UTF-8 text round-trips)."""
    tokenizer.normalizer = normalizers.NFC()
    split = pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tokenizer.decoder = decoders.ByteLevel()


def qwen_tokenizer_from_vocab(vocab_path, merges_path):
    """Qwen2's tokenizer from its two BPE files (what `tokenizer.json` holds, rebuilt step by step)."""
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    bpe = BPE(vocab=vocab, merges=read_merges(merges_path), unk_token=None, fuse_unk=False, byte_fallback=False)
    tokenizer = RustTokenizer(bpe)
    use_qwen_pipeline(tokenizer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_PLAIN_ADDED_TOKENS])
    return tokenizer


def train_tokenizer(texts, vocab_size):
    """A small byte-level BPE learnt from `texts`, with Qwen's pipeline and ChatML tokens: the offline demo needs no
    Qwen files. Any text stays encodable (all 256 bytes are in the vocabulary)."""
    tokenizer = RustTokenizer(BPE(unk_token=None))
    use_qwen_pipeline(tokenizer)
    special_tokens = QWEN_SPECIAL_TOKENS[:3]  # <|endoftext|>, <|im_start|>, <|im_end|>
    # The trainer would learn merges across "<|im_start|>" as if it were text: learn from what lies between.
    between_specials = re.compile("|".join(re.escape(token) for token in special_tokens))
    pieces = [piece for text in texts for piece in between_specials.split(text) if piece]
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(pieces, trainer)
    return Tokenizer(tokenizer)


class Tokenizer:
    """Text <-> token ids, with the ids of the ChatML tokens at hand."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # a `tokenizers.Tokenizer`
        self.im_start_id, self.im_end_id, self.eos_id = map(self.token_id, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
        self.pad_id = self.eos_id  # Qwen pads with <|endoftext|>; padded positions are masked anyway
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_pretrained(cls, name_or_path):
        """A folder with tokenizer.json (preferred) or vocab.json + merges.txt, or a Hub repo id."""
        folder = local_or_hub(name_or_path, allow_patterns=TOKENIZER_FILES)
        tokenizer_json, vocab, merges = (os.path.join(folder, name) for name in TOKENIZER_FILES)
        if os.path.exists(tokenizer_json):
            return cls(RustTokenizer.from_file(tokenizer_json))
        if os.path.exists(vocab) and os.path.exists(merges):
            return cls(qwen_tokenizer_from_vocab(vocab, merges))
        raise FileNotFoundError(f"{folder} holds neither tokenizer.json nor vocab.json + merges.txt")

    def token_id(self, token):
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {token} token, which the chat format needs")
        return token_id

    def encode(self, text):
        """Special tokens written in the text become their ids; no BOS. For a dataset's or user's text: encode_text."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_text(self, text):
        """The text as written: a special token's name in it ("<|im_end|>" quoted) becomes its characters (turn_ids
        adds the markers as ids); non-special added tokens ("<tool_call>") still match, as in transformers."""
        self.tokenizer.encode_special_tokens = True
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            self.tokenizer.encode_special_tokens = False

    def decode(self, ids, skip_special_tokens=True):
        """Token ids (a list, or a 1-d tensor) -> text."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, folder):
        """Write tokenizer.json, so a checkpoint folder carries the tokenizer it was trained with."""
        os.makedirs(folder, exist_ok=True)
        self.tokenizer.save(os.path.join(folder, "tokenizer.json"))


# --- 2. Chat format (ChatML, as Qwen2.5 was trained with) -------------------------------------------------
# LLaVA-NeXT's system turn for Qwen (its preprocess_qwen), not Qwen2.5's ("You are Qwen, created by Alibaba Cloud. ...")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
LLAVA_ROLES = {"human": "user", "gpt": "assistant"}
# the short-caption instruction: config/caption_coco.py trains on it, eval.py and sample.py ask it by default.
# InternVL's fine-tuning turns COCO's Karpathy train split into dialogues with it (LLaVA-1.5: TextCaps), and
# lmms-eval asks it for COCO and Flickr30k captions, so zero-shot scores compare with published ones
SHORT_CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."


def chat_prompt(messages, add_generation_prompt=True, system_prompt=DEFAULT_SYSTEM_PROMPT):
    """[{"role", "content"}, ...] -> "<|im_start|>{role}\\n{content}<|im_end|>\\n"..., a system turn in front
    (with_system_turn), ending "<|im_start|>assistant\\n" if the model answers next. As token ids: chat_ids."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in with_system_turn(messages, system_prompt))
    return text + "<|im_start|>assistant\n" if add_generation_prompt else text


def with_system_turn(messages, system_prompt):
    """The messages, led by a system turn of `system_prompt` unless they bring their own or it is None."""
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}] + list(messages)
    return list(messages)


def turn_ids(tokenizer, role, content):
    """One turn as token ids: the markers as ids, the rest as text, so a content quoting one cannot end its turn."""
    return [tokenizer.im_start_id, *tokenizer.encode_text(f"{role}\n{content}"), tokenizer.im_end_id,
            *tokenizer.encode_text("\n")]


def answer_header_ids(tokenizer):
    """"<|im_start|>assistant\\n": where the prompt ends and the answer starts."""
    return [tokenizer.im_start_id, *tokenizer.encode_text("assistant\n")]


def chat_ids(tokenizer, messages, add_generation_prompt=True, system_prompt=DEFAULT_SYSTEM_PROMPT):
    """chat_prompt() as the token ids the model reads, each content encoded as text (turn_ids)."""
    ids = [i for m in with_system_turn(messages, system_prompt) for i in turn_ids(tokenizer, m["role"], m["content"])]
    return ids + answer_header_ids(tokenizer) if add_generation_prompt else ids


def conversation_messages(conversation):
    """LLaVA turns [{"from": "human"|"gpt", "value": str}, ...] -> ChatML messages [{"role", "content"}], less
    the answers before the first question (they teach nothing a prompt asks for; LLaVA drops one such turn).
    Raises ValueError, saying what is wrong, unless the turns from there alternate human, gpt, human..."""
    if not isinstance(conversation, list) or not conversation:
        raise ValueError(f"a conversation must be a non-empty list of turns, got {conversation!r:.80}")
    first_question = next((i for i, turn in enumerate(conversation)
                           if not (isinstance(turn, dict) and turn.get("from") == "gpt")), len(conversation))
    if first_question == len(conversation):
        raise ValueError("every turn is from 'gpt': there is no question to answer")
    messages = []
    for i, turn in enumerate(conversation[first_question:], start=first_question):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or turn["from"] not in LLAVA_ROLES:
            raise ValueError(f"turn {i} must have 'from' = 'human' or 'gpt', got {turn!r:.80}")
        expected = "human" if (i - first_question) % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise ValueError(f"turn {i} is from {turn['from']!r}, expected {expected!r}: "
                             "turns must alternate, a question first")
        if not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i} has a {type(turn.get('value')).__name__} value, expected a string")
        text = turn_text(turn["value"])
        if turn["from"] == "gpt" and not text:
            raise ValueError(f"turn {i} is an empty answer: it would teach the model to stop at once")
        messages.append({"role": LLAVA_ROLES[turn["from"]], "content": text})
    if len(messages) % 2:
        raise ValueError("the last turn is a question without an answer")
    return messages


def turn_text(text):
    """A turn as the model reads it in training and at inference (sample.prompt_ids): without LLaVA's <image> (the
    image tokens lead all text, paper 3.1), every turn stripped, so a question reads the same with or without it."""
    return text.replace("<image>", "").strip()


def encode_conversation(tokenizer, conversation, system_prompt=DEFAULT_SYSTEM_PROMPT):
    """LLaVA turns -> (input_ids, labels), one ChatML sequence however many turns (paper 3.4, stage 3). labels[i] =
    input_ids[i] (the model shifts) on each answer and its <|im_end|> (the model learns to stop), else IGNORE_INDEX:
    system and user turns, the "<|im_start|>assistant\n" header (the prompt at inference ends with it, so it is
    encoded apart) and the "\n" after <|im_end|> (generation stops there)."""
    input_ids, labels = [], []
    for message in with_system_turn(conversation_messages(conversation), system_prompt):
        if message["role"] == "assistant":
            answer = tokenizer.encode_text(message["content"]) + [tokenizer.im_end_id]
            pieces = [(answer_header_ids(tokenizer), False), (answer, True), (tokenizer.encode_text("\n"), False)]
        else:
            pieces = [(turn_ids(tokenizer, message["role"], message["content"]), False)]
        for ids, carries_loss in pieces:
            input_ids += ids
            labels += ids if carries_loss else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


# --- 3. Images (the same steps as transformers' SiglipImageProcessor) -------------------------------------
IMAGE_MEAN = IMAGE_STD = 0.5  # SigLIP's, for every channel: pixels land in [-1, 1]


def to_rgb(image):
    """Any PIL mode -> RGB, transparent pixels laid over white (as transformers does), not left their stored colour.
    By design, as transformers' and LLaVA's processors: 16-bit images convert as PIL converts them (clipped at
    255), and EXIF orientation is not applied."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def load_image(source, name):
    """A file path, encoded bytes (PNG, JPEG, ...) or a PIL image -> PIL RGB image. A missing or undecodable
    image raises ValueError naming `name` (a file, or a dataset row), so the dataset can skip it and say which."""
    if isinstance(source, (str, os.PathLike)) and os.path.exists(source) and not os.path.isfile(source):
        raise ValueError(f"cannot read image {name}: {source} is not a regular file")  # a FIFO would block for ever
    try:
        image = source
        if not isinstance(source, Image.Image):
            image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
            image.load()  # decode now: PIL opens lazily, and a truncated file only fails here
        return to_rgb(image)
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, struct.error...) on bad bytes
        raise ValueError(f"cannot read image {name}: {error}") from error


def preprocess_image(image, image_size=224):
    """PIL image -> FloatTensor[3, image_size, image_size] in [-1, 1]: RGB, the whole image resized bicubic to a
    square (no crop, aspect ratio not kept, as in SigLIP's training), scaled, normalised."""
    image = to_rgb(image).resize((image_size, image_size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
    return (pixels - IMAGE_MEAN) / IMAGE_STD


# --- 4. Sources -------------------------------------------------------------------------------------------
# A source lists its samples in chunks (each read at once: a parquet row group, or all samples reached by index) as
# `chunk_sizes`, from metadata; `read(chunk, rows)` gives those rows of a chunk, in order, as records {"name": where
# the row is, for messages, "image": bytes | path | PIL image | None (text only), "conversations": LLaVA turns}.

def find_files(path_or_repo, pattern):
    """Files matching `pattern` in a local folder (recursively) or a Hub dataset repo (downloading only those, in
    its folders too: data/train-00000-of-00004.parquet); a single local file as is."""
    if os.path.isfile(path_or_repo):
        return [path_or_repo]
    folder = local_or_hub(path_or_repo, allow_patterns=[pattern, f"*/{pattern}"], repo_type="dataset")
    files = sorted(glob.glob(os.path.join(folder, "**", pattern), recursive=True))
    if not files:
        raise FileNotFoundError(f"no {pattern} files in {path_or_repo}")
    return files


def open_parquet(path):
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise OSError(f"{path} is not a readable parquet file (truncated or corrupt?): {error}") from error


def parquet_image(cell):
    """An image cell -> encoded bytes, a file path (from the working directory) or None (text only): Hugging Face
    datasets writes {bytes, path} (the path alone if not embedded); a binary column holds bytes, a string a path."""
    if isinstance(cell, dict):
        return cell["bytes"] if cell.get("bytes") is not None else cell.get("path")
    return cell


class LlavaParquet:
    """LLaVA-ReCap 118K / 558K and LLaVA-NeXT-Data: parquet shards (id, image {bytes, path}, conversations) in a
    file, folder or Hub dataset repo, picked by `pattern` ("data/train-*.parquet"); read a row group at a time."""
    columns = ["id", "image", "conversations"]

    def __init__(self, path_or_repo, pattern="*.parquet"):
        self.chunks, self.chunk_sizes = [], []  # chunks: (file, row group, index of its first row in the file)
        for path in find_files(path_or_repo, pattern):
            metadata = open_parquet(path).metadata
            self.check_layout(path, metadata.schema.to_arrow_schema())
            sizes = [metadata.row_group(group).num_rows for group in range(metadata.num_row_groups)]
            self.chunks += [(path, group, sum(sizes[:group])) for group in range(len(sizes))]
            self.chunk_sizes += sizes

    def check_layout(self, path, schema):
        """The layout's columns must be there, the image column holding what parquet_image reads."""
        missing = set(self.columns) - set(schema.names)
        if missing:
            raise ValueError(f"{path} lacks the columns {sorted(missing)} of the {type(self).__name__} layout")
        kind = schema.field("image").type
        if pa.types.is_struct(kind):
            known = bool({"bytes", "path"} & {field.name for field in kind})
        else:  # null: a shard of text-only rows
            known = any(is_kind(kind) for is_kind in (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_string,
                                                      pa.types.is_large_string, pa.types.is_null))
        if not known:
            raise ValueError(f"{path}: the image column is {kind}; expected {{bytes, path}} (as Hugging Face datasets "
                             "writes images), binary (encoded images) or string (file paths)")

    def read(self, chunk, rows):
        path, group, first_row = self.chunks[chunk]
        try:  # one thread: the DataLoader workers are the parallelism
            table = open_parquet(path).read_row_group(group, columns=self.columns, use_threads=False)
            values = table.take(rows).to_pylist()  # decodes the strings: a corrupt page may only fail here
        except (OSError, pa.ArrowException, UnicodeDecodeError) as error:
            raise OSError(f"{path}: cannot read row group {group} (corrupt file?): {error}") from error
        return [self.record(row, f"{path} row {first_row + i}") for i, row in zip(rows, values)]

    def record(self, row, name):
        return {"name": f"{name} (id {row['id']})", "image": parquet_image(row["image"]),
                "conversations": row["conversations"]}


class PathVQAParquet(LlavaParquet):
    """PathVQA (flaviagiammarino/path-vqa): parquet (image, question, answer); `pattern` picks the split, "train-*"."""
    columns = ["image", "question", "answer"]

    def record(self, row, name):
        conversation = [{"from": "human", "value": row["question"]}, {"from": "gpt", "value": row["answer"]}]
        return {"name": name, "image": parquet_image(row["image"]), "conversations": conversation}


class IndexedSource:
    """Samples reached by index, no file to read first: one chunk (so the shuffle is a full one), its records made
    one at a time as a worker gets to them. Subclasses give record(index) and `entries` (or __len__)."""

    def __len__(self):
        return len(self.entries)

    @property
    def chunk_sizes(self):
        return [len(self)]

    def read(self, chunk, rows):
        return (self.record(row) for row in rows)


class LlavaJson(IndexedSource):
    """LLaVA's own layout: a JSON list of {id, image (a path in image_folder; none: text-only), conversations}."""

    def __init__(self, json_path, image_folder):
        self.entries = read_json(json_path)
        self.json_path, self.image_folder = json_path, image_folder
        # an entry that is not an object is a broken file, not a text-only sample: say so before training
        if not isinstance(self.entries, list):
            raise ValueError(f"{json_path} holds a {type(self.entries).__name__}, expected a list of entries")
        broken = [i for i, entry in enumerate(self.entries) if not isinstance(entry, dict)]
        if broken:
            raise ValueError(f"{json_path}: {len(broken)} entries are not objects {{id, image, conversations}}, "
                             f"the first at index {broken[0]}: {self.entries[broken[0]]!r:.80}")

    def record(self, row):
        entry = self.entries[row]
        image = entry.get("image")
        if isinstance(image, str):
            image = os.path.join(self.image_folder, image)
        return {"name": f"{self.json_path} entry {row} (id {entry.get('id')}, image {image})", "image": image,
                "conversations": entry.get("conversations")}


class KarpathyCaptions(IndexedSource):
    """COCO / Flickr30k / Flickr8k captions in Karpathy's split files (dataset_coco.json), one sample per (image,
    reference sentence): an epoch trains on every caption once, each image ~5 times (COCO train + restval: 113,287
    images, 566,747 samples); split="train" takes train + restval, as usual. Images: image_root/[filepath/]filename."""

    def __init__(self, json_path, image_root, split="train", prompt=SHORT_CAPTION_PROMPT):
        images = read_json(json_path).get("images", [])
        splits = {"train", "restval"} if split == "train" else {split}
        chosen = [(i, image) for i, image in enumerate(images) if image.get("split") in splits]
        unlaid = [i for i, image in chosen if "filename" not in image or not isinstance(image.get("sentences"), list)
                  or not all("raw" in sentence for sentence in image["sentences"])]
        if unlaid:
            raise ValueError(f"{json_path}: {len(unlaid)} entries lack a filename or sentences [{{'raw'}}], the first "
                             f"images[{unlaid[0]}]: {images[unlaid[0]]!r:.120}")
        if not chosen:
            raise ValueError(f"{json_path} has no {' or '.join(sorted(splits))} images; its splits are "
                             f"{sorted({str(image.get('split')) for image in images})}")
        self.entries = [(os.path.join(image_root, image.get("filepath", ""), image["filename"]), sentence["raw"])
                        for _, image in chosen for sentence in image["sentences"]]
        self.prompt = prompt

    def record(self, row):
        path, sentence = self.entries[row]
        conversation = [{"from": "human", "value": self.prompt}, {"from": "gpt", "value": sentence.strip()}]
        return {"name": f"{path} sentence {sentence!r:.40}", "image": path, "conversations": conversation}


# --- 5. Batches -------------------------------------------------------------------------------------------
def make_sample(record, tokenizer, image_size, max_text_tokens, system_prompt):
    """A record -> ({"pixel_values", "input_ids", "labels"}, whether the text was truncated). A bad conversation
    or image raises ValueError naming the record; the text goes first, as it is cheap and spares the decoding."""
    try:
        input_ids, labels = encode_conversation(tokenizer, record["conversations"], system_prompt)
    except ValueError as error:
        raise ValueError(f"{record['name']}: {error}") from error
    truncated = len(input_ids) > max_text_tokens
    input_ids, labels = input_ids[:max_text_tokens], labels[:max_text_tokens]
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(f"{record['name']}: no answer token is left after truncating to {max_text_tokens} tokens")
    pixel_values = preprocess_image(load_image(record["image"], record["name"]), image_size)
    return {"pixel_values": pixel_values, "input_ids": input_ids, "labels": labels}, truncated


def collate(samples, n_image_tokens, pad_id, pad_to_multiple=1):
    """Samples -> a batch of one [image | text] document per row (pack_documents' layout), right-padded to the
    longest, rounded up to `pad_to_multiple` so that a compiled model meets few distinct shapes."""
    return pack_documents(samples, None, n_image_tokens, pad_id, [[i] for i in range(len(samples))], pad_to_multiple)


def fill_rows(lengths, max_len):
    """Documents of `lengths` tokens -> rows of at most max_len tokens (lists of document indices), each left
    with as little room as a quick "minimum bin slack" search finds: the longest document left opens the row,
    each other length is tried second, the row topped up with the longest that still fit, the fullest kept.
    Every document carries its 256 image tokens and conversations fill a third of a row or more, so first-fit's
    gaps often fit nothing: on bench.py's stand-in for stage 3, 1.9% of the tokens are padding (first-fit 5.1%)."""
    too_long = [i for i, length in enumerate(lengths) if length > max_len]
    if too_long:
        raise ValueError(f"samples {too_long[:5]} have more than max_len={max_len} tokens (image + text); "
                         "truncate them first")
    left = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows = []
    while left:
        first, others = left[0], left[1:]
        room_after_first = max_len - lengths[first]
        best, best_room, tried = [first], room_after_first, set()
        for k, second in enumerate(others):
            if best_room == 0:
                break
            if lengths[second] > room_after_first or lengths[second] in tried:
                continue
            tried.add(lengths[second])
            row, room = [first, second], room_after_first - lengths[second]
            for i in others[:k] + others[k + 1:]:
                if lengths[i] <= room:
                    row, room = row + [i], room - lengths[i]
            if room < best_room:
                best, best_room = row, room
        rows.append(best)
        left = [i for i in others if i not in best]
    return rows


def pack_documents(samples, max_len, n_image_tokens, pad_id=0, rows=None, pad_to_multiple=1):
    """Pack [image | text] documents (make_sample's samples) into `rows` of fill_rows (lists of sample indices; all
    by default), so variable-length conversations waste little on padding. Rows are as long as the fullest, rounded
    up to `pad_to_multiple` (few shapes for compiled blocks), at most max_len (None: no limit): a batch's last rows
    are often far from full. Returns VLM.forward's arguments: "pixel_values" [N, 3, H, W], one per document in row
    order; "input_ids", "labels", "document" [rows, length], each document's image slots (input pad_id, label
    IGNORE_INDEX) then its text, `document` numbering a row's documents 0, 1, ... and padding -1; "label_positions",
    labels.flatten()'s labelled entries, listed on the host (find_label_positions): the step never waits for the GPU."""
    lengths = [n_image_tokens + len(s["input_ids"]) for s in samples]
    if rows is None:
        rows = fill_rows(lengths, max_len)
    fullest = max(sum(lengths[i] for i in docs) for docs in rows)
    length = -(-fullest // pad_to_multiple) * pad_to_multiple
    length = length if max_len is None else min(max_len, length)
    input_ids, labels, document = (torch.full((len(rows), length), fill, dtype=torch.long)
                                   for fill in (pad_id, IGNORE_INDEX, -1))
    for r, docs in enumerate(rows):
        start = 0
        for d, i in enumerate(docs):
            text_start, end = start + n_image_tokens, start + lengths[i]
            input_ids[r, text_start:end] = torch.as_tensor(samples[i]["input_ids"])
            labels[r, text_start:end] = torch.as_tensor(samples[i]["labels"])
            document[r, start:end] = d
            start = end
    pixel_values = torch.stack([samples[i]["pixel_values"] for docs in rows for i in docs])
    return {"pixel_values": pixel_values, "input_ids": input_ids, "labels": labels, "document": document,
            "label_positions": find_label_positions(labels)}


def pack_micro_batches(samples, max_len, n_image_tokens, pack_rows, pad_id=0, pad_to_multiple=1):
    """`samples` packed into rows (fill_rows), cut into micro-batches of at most `pack_rows` rows (pack_documents)."""
    filled = fill_rows([n_image_tokens + len(s["input_ids"]) for s in samples], max_len)
    return [pack_documents(samples, max_len, n_image_tokens, pad_id, filled[i:i + pack_rows], pad_to_multiple)
            for i in range(0, len(filled), pack_rows)]


def shuffled_order(chunk_sizes, seed, epoch, window=1):
    """Every sample once, as (chunk ids, row ids, window ids) arrays: chunks in random order, taken `window` at a time,
    the rows of a window's chunks shuffled together (window=1: each chunk's rows, kept together)."""
    rng = np.random.default_rng([seed, epoch])
    chunk_order = rng.permutation(len(chunk_sizes))
    chunk_ids, row_ids, window_ids = [], [], []
    for index, start in enumerate(range(0, len(chunk_order), window)):
        chunks = chunk_order[start:start + window]
        mix = rng.permutation(sum(chunk_sizes[chunk] for chunk in chunks))
        chunk_ids.append(np.concatenate([np.full(chunk_sizes[chunk], chunk) for chunk in chunks])[mix])
        row_ids.append(np.concatenate([np.arange(chunk_sizes[chunk]) for chunk in chunks])[mix])
        window_ids.append(np.full(len(mix), index))
    return np.concatenate(chunk_ids), np.concatenate(row_ids), np.concatenate(window_ids)


class WorkerBatches(IterableDataset):
    """What each DataLoader worker runs on the samples still to come, (chunk ids, row ids, window ids): batch b is
    samples [b*B, (b+1)*B); worker w of W builds batches w, w+W, ..., taken in turn by the DataLoader, so in order."""

    def __init__(self, stream, chunk_ids, row_ids, window_ids):
        self.stream, self.chunk_ids, self.row_ids, self.window_ids = stream, chunk_ids, row_ids, window_ids

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        batch_size = self.stream.batch_size
        slots = np.arange(len(self.row_ids))
        records = self.read_records(slots[(slots // batch_size) % num_workers == worker_id])
        for batch_index, group in itertools.groupby(records, key=lambda slot_record: slot_record[0] // batch_size):
            yield {"batch_index": int(batch_index), **self.stream.build_batch(record for _, record in group)}

    def read_records(self, slots):
        """(slot, record) for each slot, in order, reading each chunk once per window: the window's rows this worker
        needs from a chunk are asked for at once, in slot order, then the slots take their records in turn."""
        for _, window in itertools.groupby(slots, key=lambda slot: self.window_ids[slot]):
            window = np.fromiter(window, dtype=np.int64)
            chunks = self.chunk_ids[window]
            # a parquet read returns its records (held until the window ends); an IndexedSource's makes them lazily
            reads = {chunk: iter(self.stream.source.read(int(chunk), self.row_ids[window[chunks == chunk]].tolist()))
                     for chunk in np.unique(chunks)}
            for slot, chunk in zip(window, chunks):
                yield slot, next(reads[chunk])


class BatchStream:
    """The batches one rank trains on, each iteration the rest of the epoch, decoded by `num_workers` DataLoader
    workers. A batch, this rank's `batch_size` samples of an optimizer step, is micro-batches: `micro_batch` samples
    padded to the longest (collate), or with `pack_length` the whole batch packed into rows of that many tokens,
    `pack_rows` (a padded micro-batch's tokens) per micro-batch (pack_micro_batches), which leaves fewer rows part-empty
    than packing each micro-batch: on bench.py's stand-in for stage 3, 1.9% of the tokens pad on one GPU, 4.5% on eight
    (16 conversations a rank and step), 36% in padded micro-batches. Order: a shuffle of the source per (seed, epoch),
    whatever num_workers (shuffled_order): the rows of `shuffle_chunks` random chunks (parquet row groups) at a time,
    so that a batch mixes the sources that shards keep apart (LLaVA-NeXT-Data's are sorted by source); rank r takes
    samples r, r + world_size, ... (an epoch's last < world_size left out). The cost: a worker reads each chunk of each
    window its batches touch (a row group is read up to num_workers times per rank, 1 or 2 at shuffle_chunks=1) and
    holds its share of the window's records, at most shuffle_chunks row groups. Hugging Face writes image parquet in
    row groups of <= 100 rows: ~12 MB in LLaVA-NeXT-Data (92 GB, 779K rows), ~16 MB in LLaVA-ReCap-118K (COCO). Bad
    samples (unreadable image, malformed conversation) are skipped with a warning naming them, text-only rows (the image
    leads every sequence, paper 3.1; LLaVA-NeXT-Data has some) silently; both are counted, and bad ones past
    max_skip_fraction of an epoch's, or text-only ones past max_text_only_fraction, raise RuntimeError. A batch that loses samples keeps its place, smaller (one that
    loses all is dropped: ranks may then step unequally), so `state_dict()` resumes at the next unseen one."""
    counted = ("skipped", "text_only", "truncated")  # for the trainer's log; "truncated": texts cut to max_text_tokens

    def __init__(self, source, tokenizer, batch_size, n_image_tokens, micro_batch=None, image_size=224,
                 max_text_tokens=512, system_prompt=DEFAULT_SYSTEM_PROMPT, seed=0, rank=0, world_size=1, num_workers=2,
                 max_skip_fraction=0.01, pad_to_multiple=1, pack_length=0, shuffle_chunks=16, max_text_only_fraction=1.0):
        self.source, self.tokenizer, self.batch_size = source, tokenizer, batch_size
        self.micro_batch, self.n_image_tokens = micro_batch or batch_size, n_image_tokens
        self.image_size, self.max_text_tokens, self.system_prompt = image_size, max_text_tokens, system_prompt
        self.seed, self.rank, self.world_size, self.num_workers = seed, rank, world_size, num_workers
        self.max_skip_fraction, self.pad_to_multiple, self.pack_length = max_skip_fraction, pad_to_multiple, pack_length
        self.shuffle_chunks, self.max_text_only_fraction = shuffle_chunks, max_text_only_fraction
        if shuffle_chunks < 1:
            raise ValueError(f"shuffle_chunks={shuffle_chunks}: at least 1 chunk (row group) is shuffled at a time")
        if pack_length and pack_length < n_image_tokens + max_text_tokens:
            raise ValueError(f"pack_length={pack_length} cannot hold one sample of {n_image_tokens} image tokens + "
                             f"max_text_tokens={max_text_tokens}")
        self.pack_rows = max(1, self.micro_batch * (n_image_tokens + max_text_tokens) // pack_length) if pack_length else 0
        self.samples_per_epoch = sum(source.chunk_sizes) // world_size
        if self.samples_per_epoch == 0:
            raise ValueError(f"the source has {sum(source.chunk_sizes)} samples, fewer than world_size={world_size}")
        self.epoch, self.samples_consumed, self.counts = 0, 0, dict.fromkeys(self.counted, 0)

    def __len__(self):  # batches per epoch, on this rank
        return math.ceil(self.samples_per_epoch / self.batch_size)

    def __iter__(self):
        order = shuffled_order(self.source.chunk_sizes, self.seed, self.epoch, self.shuffle_chunks)
        start, mine = self.samples_consumed, slice(self.rank, self.world_size * self.samples_per_epoch, self.world_size)
        workers = WorkerBatches(self, *(ids[mine][start:] for ids in order))  # this rank's samples still to come
        loader = DataLoader(workers, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
        yielded = False
        for item in loader:
            self.samples_consumed = min(start + (item["batch_index"] + 1) * self.batch_size, self.samples_per_epoch)
            self.add_counts(item["counts"])
            if item["batch"] is not None:
                yielded = True
                yield item["batch"]
        if start == 0 and not yielded:  # else training would go through empty epochs for ever
            raise RuntimeError(f"epoch {self.epoch} of {self.samples_per_epoch} samples gave none to train on (so far "
                               f"{self.counts['text_only']} rows without an image, {self.counts['skipped']} bad ones: "
                               "see the warnings)")
        self.epoch, self.samples_consumed = self.epoch + 1, 0

    def build_batch(self, records):
        """Runs in a worker: records -> {"batch": its micro-batches, or None if all were skipped, "counts"}."""
        samples, counts = [], dict.fromkeys(self.counted, 0)
        for record in records:
            if record["image"] is None:
                counts["text_only"] += 1
                continue
            try:
                sample, truncated = make_sample(record, self.tokenizer, self.image_size, self.max_text_tokens,
                                                self.system_prompt)
                samples.append(sample)
                counts["truncated"] += truncated
            except ValueError as error:
                logger.warning("skipping a bad sample: %s", error)
                counts["skipped"] += 1
        return {"batch": self.micro_batches(samples) if samples else None, "counts": counts}

    def micro_batches(self, samples):
        if self.pack_length:
            return pack_micro_batches(samples, self.pack_length, self.n_image_tokens, self.pack_rows, self.tokenizer.pad_id,
                                      self.pad_to_multiple)
        return [collate(samples[i:i + self.micro_batch], self.n_image_tokens, self.tokenizer.pad_id, self.pad_to_multiple)
                for i in range(0, len(samples), self.micro_batch)]

    def add_counts(self, counts):
        for key, value in counts.items():
            self.counts[key] += value
        begun = self.samples_per_epoch * (self.epoch + 1)  # the samples of the epochs begun so far
        if self.counts["skipped"] > self.max_skip_fraction * begun:
            raise RuntimeError(f"{self.counts['skipped']} bad samples skipped by sample {self.samples_consumed} of epoch "
                               f"{self.epoch}, more than max_skip_fraction={self.max_skip_fraction} of the "
                               f"{self.samples_per_epoch} per epoch: see the warnings for which ones, fix the data or "
                               "raise max_skip_fraction")
        if self.counts["text_only"] > self.max_text_only_fraction * begun:  # e.g. an image column read as empty
            raise RuntimeError(f"{self.counts['text_only']} rows without an image by sample {self.samples_consumed} of "
                               f"epoch {self.epoch}, more than max_text_only_fraction={self.max_text_only_fraction} of "
                               f"the {self.samples_per_epoch} per epoch: check the data's image column, or raise "
                               "max_text_only_fraction if the data has that many text-only rows")

    def state_dict(self):
        return {"epoch": self.epoch, "samples_consumed": self.samples_consumed, "counts": dict(self.counts),
                "seed": self.seed, "world_size": self.world_size, "shuffle_chunks": self.shuffle_chunks}

    def load_state_dict(self, state):
        if "shuffle_chunks" not in state:
            raise ValueError("the saved data position lacks shuffle_chunks: written by an older version of this code, "
                             "whose order cannot be continued; start a new out_dir with --init_from the checkpoint")
        saved = state["seed"], state["world_size"], state["shuffle_chunks"]
        if saved != (self.seed, self.world_size, self.shuffle_chunks):
            raise ValueError(f"the saved position is for seed, world_size, shuffle_chunks = {saved}, not "
                             f"{(self.seed, self.world_size, self.shuffle_chunks)}: it would not resume the same order")
        self.epoch, self.samples_consumed = state["epoch"], state["samples_consumed"]
        self.counts = dict(state["counts"])

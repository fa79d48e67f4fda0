"""Training data: conversations -> labels, sources, and the shuffled, sharded, resumable batch stream.

Parquet and JSON fixtures are written here with pyarrow and PIL, in the layouts of the real datasets."""
import io
import json
import logging
import os
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
from data import (IGNORE_INDEX, BatchStream, IndexedSource, KarpathyCaptions, LlavaJson, LlavaParquet, PathVQAParquet,
                  Tokenizer, WorkerBatches, chat_ids, chat_prompt, collate, conversation_messages, encode_conversation,
                  make_sample, preprocess_image, shuffled_order)
from data_helpers import copy_qwen_bpe_files
from shapes import SyntheticShapes, shapes_tokenizer


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return Tokenizer.from_pretrained(str(copy_qwen_bpe_files(tmp_path_factory.mktemp("qwen_bpe"))))


@pytest.fixture(scope="module")
def tokenizer():
    """The demo's tiny tokenizer: byte-level, so it encodes any text, and fast to build."""
    return shapes_tokenizer()


# --- conversations -> (input_ids, labels) -------------------------------------------------------------------

TWO_TURNS = [
    {"from": "human", "value": "<image>\nWhat is in the image?"},
    {"from": "gpt", "value": "A cat."},
    {"from": "human", "value": "What colour is it?"},
    {"from": "gpt", "value": "Black."},
]


def test_loss_is_on_the_answers_and_their_im_end_only(qwen):
    input_ids, labels = encode_conversation(qwen, TWO_TURNS)
    expected = [  # (Qwen2.5 token ids, carry loss?)
        # <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
        ([151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198], False),
        # <|im_start|>user\nWhat is in the image?<|im_end|>\n                (the <image> placeholder is gone)
        ([151644, 872, 198, 3838, 374, 304, 279, 2168, 30, 151645, 198], False),
        ([151644, 77091, 198], False),  # <|im_start|>assistant\n  (at inference the prompt ends with it)
        ([32, 8251, 13, 151645], True),  # A cat.<|im_end|>          (the answer, and where it stops)
        ([198], False),  # \n
        # <|im_start|>user\nWhat colour is it?<|im_end|>\n
        ([151644, 872, 198, 3838, 12463, 374, 432, 30, 151645, 198], False),
        ([151644, 77091, 198], False),  # <|im_start|>assistant\n
        ([14417, 13, 151645], True),  # Black.<|im_end|>
        ([198], False),  # \n
    ]
    assert input_ids == [i for ids, _ in expected for i in ids]
    assert labels == [i if loss else IGNORE_INDEX for ids, loss in expected for i in ids]
    assert qwen.decode(input_ids, skip_special_tokens=False).startswith("<|im_start|>system\nYou are")


def test_the_training_sequence_is_the_inference_prompt_format(qwen):
    """What the model is trained on is exactly what chat_prompt() builds at inference (as token ids,
    chat_ids), plus the answers."""
    messages = conversation_messages(TWO_TURNS)
    input_ids, _ = encode_conversation(qwen, TWO_TURNS)
    assert input_ids == qwen.encode(chat_prompt(messages, add_generation_prompt=False))
    prompt = chat_ids(qwen, messages[:1])
    assert prompt == qwen.encode(chat_prompt(messages[:1]))
    assert input_ids[:len(prompt)] == prompt and input_ids[len(prompt):len(prompt) + 4] == [32, 8251, 13, 151645]


def test_a_text_that_quotes_the_chat_markers_is_text(qwen):
    """Data that writes "<|im_end|>" or "<|endoftext|>" (a caption about chat formats, a scraped page) is
    trained on as those characters: only the chat format's own markers are special tokens, so an answer
    cannot end early or teach the model to emit the end of text (which is also the padding)."""
    quoting = [{"from": "human", "value": "What does <|im_end|> mean?"},
               {"from": "gpt", "value": "It ends a turn, like <|endoftext|> ends a text."}]
    input_ids, labels = encode_conversation(qwen, quoting)
    answer = [t for t in labels if t != IGNORE_INDEX]
    assert answer[-1] == qwen.im_end_id and qwen.im_end_id not in answer[:-1] and qwen.eos_id not in answer
    assert qwen.decode(answer[:-1], skip_special_tokens=False) == "It ends a turn, like <|endoftext|> ends a text."
    assert input_ids.count(qwen.im_end_id) == 3 and input_ids.count(qwen.im_start_id) == 3  # system, user, answer
    prompt = chat_ids(qwen, conversation_messages(quoting)[:1])
    assert input_ids[:len(prompt)] == prompt  # inference reads the question the same way


def test_captioning_is_the_one_turn_case_and_the_system_turn_is_optional(qwen):
    caption = [{"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": "A cat on a mat."}]
    input_ids, labels = encode_conversation(qwen, caption, system_prompt=None)
    assert qwen.decode(input_ids, skip_special_tokens=False) == \
        "<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\nA cat on a mat.<|im_end|>\n"
    assert [t for t in labels if t != IGNORE_INDEX] == qwen.encode("A cat on a mat.<|im_end|>")


def test_answers_before_the_first_question_are_dropped_and_the_row_kept(tokenizer):
    """Some LLaVA rows open with a gpt turn; LLaVA's preprocessing drops it, and so does ours, keeping the row."""
    opening_answer = {"from": "gpt", "value": "An answer nobody asked for."}
    assert conversation_messages([opening_answer, *TWO_TURNS]) == conversation_messages(TWO_TURNS)
    assert encode_conversation(tokenizer, [opening_answer, *TWO_TURNS]) == encode_conversation(tokenizer, TWO_TURNS)
    misplaced = [opening_answer, TWO_TURNS[0], TWO_TURNS[0]]
    with pytest.raises(ValueError, match="turn 2 is from 'human', expected 'gpt'"):  # counted as in the row
        conversation_messages(misplaced)


@pytest.mark.parametrize("conversation, problem", [
    ([], "non-empty list"),
    ("just a string", "non-empty list"),
    ([{"from": "gpt", "value": "An answer."}, {"from": "gpt", "value": "Another."}], "every turn is from 'gpt'"),
    ([{"from": "gpt", "value": "An answer first."}, {"from": "human", "value": "?"}], "without an answer"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "turn 1 is from 'human'"),
    ([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}], "turn 1 must have 'from'"),
    ([{"from": ["human"], "value": "a"}, {"from": "gpt", "value": "b"}], "turn 0 must have 'from'"),  # JSON's list
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": None}], "turn 1 has a NoneType value"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": " <image>\n"}], "turn 1 is an empty answer"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}],
     "without an answer"),
])
def test_malformed_conversations_raise_saying_what_is_wrong(tokenizer, conversation, problem):
    with pytest.raises(ValueError, match=problem):
        encode_conversation(tokenizer, conversation)


def test_truncation_keeps_the_start_and_a_fully_cut_answer_is_rejected(tokenizer):
    record = {"name": "row 5", "image": Image.new("RGB", (8, 8)), "conversations": TWO_TURNS}
    full, truncated = make_sample(record, tokenizer, image_size=16, max_text_tokens=10_000, system_prompt=None)
    assert not truncated
    cut, truncated = make_sample(record, tokenizer, image_size=16, max_text_tokens=20, system_prompt=None)
    assert truncated and cut["input_ids"] == full["input_ids"][:20] and cut["labels"] == full["labels"][:20]
    with pytest.raises(ValueError, match="row 5: no answer token"):
        make_sample(record, tokenizer, image_size=16, max_text_tokens=5, system_prompt=None)


def test_collate_lays_one_document_per_row_padded_on_the_right():
    """[2 image slots | text] per row (the slots hold pad ids and no label), then padding: document -1."""
    samples = [{"pixel_values": torch.zeros(3, 4, 4), "input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
               {"pixel_values": torch.ones(3, 4, 4), "input_ids": [8], "labels": [8]}]
    batch = collate(samples, n_image_tokens=2, pad_id=0)
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["pixel_values"][1].eq(1).all()
    assert batch["input_ids"].tolist() == [[0, 0, 5, 6, 7], [0, 0, 8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 6, 7], [-100, -100, 8, -100, -100]]
    assert batch["document"].tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, -1, -1]]
    assert batch["label_positions"].tolist() == [3, 4, 7]
    assert collate(samples, n_image_tokens=2, pad_id=0, pad_to_multiple=4)["input_ids"].shape == (2, 8)


# --- sources ------------------------------------------------------------------------------------------------

def png(colour=(200, 30, 30), size=8):
    encoded = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(encoded, format="PNG")
    return encoded.getvalue()


def caption_row(number, image=None, conversations=None):
    """A row in LLaVA-ReCap's layout whose caption says which row it is."""
    conversations = conversations or [{"from": "human", "value": "<image>\nWhat is this photo about?"},
                                      {"from": "gpt", "value": f"Caption number {number}."}]
    return {"id": f"{number:012d}", "image": {"bytes": png() if image is None else image, "path": None},
            "conversations": conversations, "data_source": "coco"}


LLAVA_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
    ("data_source", pa.string()),
])


def write_llava_parquet(path, rows, row_group_size=8):
    pq.write_table(pa.Table.from_pylist(rows, schema=LLAVA_SCHEMA), path, row_group_size=row_group_size)
    return path


def caption_numbers(batch, tokenizer):
    """Which rows a batch holds, read back from the supervised tokens ("Caption number 7.")."""
    numbers = []
    for labels in batch["labels"]:
        answer = tokenizer.decode([t for t in labels.tolist() if t != IGNORE_INDEX])
        numbers.append(int(answer.removeprefix("Caption number ").removesuffix(".")))
    return numbers


def batch_numbers(batch, tokenizer):
    """Which rows a batch (a list of micro-batches) holds."""
    return [n for micro_batch in batch for n in caption_numbers(micro_batch, tokenizer)]


def stream_numbers(stream, tokenizer):
    return [n for batch in stream for n in batch_numbers(batch, tokenizer)]


@pytest.fixture
def captions_folder(tmp_path):
    """24 rows in two shards: 16 rows (row groups of 8) and 8 rows."""
    write_llava_parquet(tmp_path / "train-00000.parquet", [caption_row(i) for i in range(16)])
    write_llava_parquet(tmp_path / "train-00001.parquet", [caption_row(i) for i in range(16, 24)])
    return tmp_path


def test_llava_parquet_is_read_row_group_by_row_group(captions_folder):
    source = LlavaParquet(str(captions_folder))
    assert source.chunk_sizes == [8, 8, 8]  # from the metadata alone
    records = source.read(1, [2, 0])  # shard 0, second row group, rows 10 and 8, in that order
    assert [r["conversations"][1]["value"] for r in records] == ["Caption number 10.", "Caption number 8."]
    assert records[0]["name"].endswith("train-00000.parquet row 10 (id 000000000010)")
    assert Image.open(io.BytesIO(records[0]["image"])).size == (8, 8)


def test_pathvqa_rows_become_one_turn_conversations(tmp_path):
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("question", pa.string()), ("answer", pa.string())])
    rows = [{"image": {"bytes": png(), "path": None}, "question": "Is there necrosis?", "answer": "yes"}]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "train-0.parquet")
    [record] = PathVQAParquet(str(tmp_path)).read(0, [0])
    assert record["conversations"] == [{"from": "human", "value": "Is there necrosis?"},
                                       {"from": "gpt", "value": "yes"}]


def test_parquet_images_embedded_by_path_or_in_plain_columns(tmp_path):
    """Hugging Face datasets embeds an image's bytes or, where it did not, keeps only its path; other writers use
    a plain binary or string column. Each reads as an image; an image that is not there is a bad sample, named."""
    (tmp_path / "on_disk.png").write_bytes(png())
    conversations = caption_row(0)["conversations"]
    by_path = [{"id": "a", "image": {"bytes": None, "path": str(tmp_path / "on_disk.png")}, "conversations": conversations},
               {"id": "b", "image": {"bytes": None, "path": str(tmp_path / "gone.png")}, "conversations": conversations}]
    write_llava_parquet(tmp_path / "by_path.parquet", by_path)
    plain = pa.table({"id": ["c"], "image": pa.array([png()], pa.binary()), "conversations": [conversations]})
    pq.write_table(plain, tmp_path / "binary.parquet")
    paths = pa.table({"id": ["d"], "image": [str(tmp_path / "on_disk.png")], "conversations": [conversations]})
    pq.write_table(paths, tmp_path / "strings.parquet")
    source = LlavaParquet(str(tmp_path))  # files in name order: binary (1 row), by_path (2), strings (1)
    records = source.read(0, [0]) + source.read(1, [0, 1]) + source.read(2, [0])
    assert [r["name"][-6:] for r in records] == ["(id c)", "(id a)", "(id b)", "(id d)"]
    assert Image.open(io.BytesIO(records[0]["image"])).size == (8, 8)
    assert records[1]["image"] == records[3]["image"] == str(tmp_path / "on_disk.png")
    assert make_sample(records[3], shapes_tokenizer(), 32, 64, "")[0]["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match=r"by_path.parquet row 1 \(id b\).*gone.png"):
        make_sample(records[2], shapes_tokenizer(), 32, 64, "")


def test_a_parquet_image_column_of_an_unknown_kind_is_an_error_naming_the_file(tmp_path):
    table = pa.table({"id": ["a"], "image": pa.array([7]), "conversations": [caption_row(0)["conversations"]]})
    pq.write_table(table, tmp_path / "numbers.parquet")
    with pytest.raises(ValueError, match=r"numbers.parquet: the image column is int64; expected \{bytes, path\}"):
        LlavaParquet(str(tmp_path))


def test_llava_json_with_an_image_folder(tmp_path):
    (tmp_path / "images" / "coco").mkdir(parents=True)
    (tmp_path / "images" / "coco" / "1.png").write_bytes(png())
    entries = [{"id": "1", "image": "coco/1.png", "conversations": TWO_TURNS},
               {"id": "2", "conversations": TWO_TURNS}]  # text-only
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    source = LlavaJson(str(tmp_path / "llava.json"), str(tmp_path / "images"))
    first, text_only = source.read(0, [0, 1])
    assert first["image"] == str(tmp_path / "images" / "coco" / "1.png") and first["conversations"] == TWO_TURNS
    assert text_only["image"] is None


def test_karpathy_split_gives_one_sample_per_train_and_restval_sentence(tmp_path):
    images = [
        {"filename": "a.jpg", "filepath": "train2014", "split": "train",
         "sentences": [{"raw": "A dog."}, {"raw": "A puppy. "}]},
        {"filename": "b.jpg", "filepath": "val2014", "split": "restval", "sentences": [{"raw": "A cat."}]},
        {"filename": "c.jpg", "filepath": "val2014", "split": "test", "sentences": [{"raw": "A bird."}]},
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    train = KarpathyCaptions(str(tmp_path / "dataset_coco.json"), "/coco", prompt="Caption it.")
    records = list(train.read(0, range(len(train))))
    assert [(r["image"], r["conversations"][1]["value"]) for r in records] == [
        ("/coco/train2014/a.jpg", "A dog."), ("/coco/train2014/a.jpg", "A puppy."), ("/coco/val2014/b.jpg", "A cat.")]
    assert records[0]["conversations"][0] == {"from": "human", "value": "Caption it."}
    assert len(KarpathyCaptions(str(tmp_path / "dataset_coco.json"), "/coco", split="test")) == 1


def test_karpathy_captions_ask_the_one_sentence_caption_instruction(tmp_path):
    """config/caption_coco.py trains on the instruction eval.py asks by default (LLaVA-NeXT and lmms-eval's)."""
    images = [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog."}]}]
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    record, = KarpathyCaptions(str(tmp_path / "dataset_flickr8k.json"), "/flickr8k").read(0, [0])
    assert record["image"] == "/flickr8k/a.jpg" and record["conversations"] == [
        {"from": "human", "value": "Provide a one-sentence caption for the provided image."},
        {"from": "gpt", "value": "A dog."}]


# --- the batch stream: order, sharding, resuming ------------------------------------------------------------

def make_stream(source, tokenizer, **overrides):
    settings = dict(batch_size=4, n_image_tokens=1, image_size=16, seed=0, num_workers=0)
    settings.update(overrides)
    return BatchStream(source, tokenizer, **settings)


def test_an_epoch_is_a_shuffle_of_every_sample_same_for_the_same_seed(captions_folder, tokenizer):
    source = LlavaParquet(str(captions_folder))
    stream = make_stream(source, tokenizer)
    first = stream_numbers(stream, tokenizer)
    assert sorted(first) == list(range(24)) and first != list(range(24))
    assert stream_numbers(make_stream(source, tokenizer), tokenizer) == first  # same seed: same order
    assert stream_numbers(make_stream(source, tokenizer, seed=1), tokenizer) != first
    second_epoch = stream_numbers(stream, tokenizer)  # iterating again starts the next epoch, reshuffled
    assert sorted(second_epoch) == list(range(24)) and second_epoch != first and stream.epoch == 2


def test_batches_are_built_in_workers_and_arrive_in_the_same_order(captions_folder, tokenizer):
    source = LlavaParquet(str(captions_folder))
    in_process = list(make_stream(source, tokenizer, batch_size=3))
    in_workers = list(make_stream(source, tokenizer, batch_size=3, num_workers=2))
    assert len(in_workers) == len(in_process) == 8
    for ours, theirs in zip(in_workers, in_process):
        [ours], [theirs] = ours, theirs  # micro_batch = batch_size: one micro-batch per batch
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_resuming_continues_with_the_next_unseen_batch(captions_folder, tokenizer):
    source = LlavaParquet(str(captions_folder))
    uninterrupted = [batch_numbers(batch, tokenizer) for batch in make_stream(source, tokenizer, batch_size=3)]
    stream = make_stream(source, tokenizer, batch_size=3, num_workers=2)
    for consumed, batch in enumerate(stream, start=1):  # DataLoader workers run ahead; only handed-out batches count
        if consumed == 3:
            break
    state = stream.state_dict()
    assert (state["epoch"], state["samples_consumed"]) == (0, 9)
    resumed = make_stream(source, tokenizer, batch_size=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives a JSON checkpoint
    assert [batch_numbers(batch, tokenizer) for batch in resumed] == uninterrupted[3:]
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["samples_consumed"] == 0
    with pytest.raises(ValueError, match="seed"):
        make_stream(source, tokenizer, seed=7).load_state_dict(state)


def test_ranks_get_disjoint_shards_that_cover_the_data(captions_folder, tokenizer):
    source = LlavaParquet(str(captions_folder))
    shards = [stream_numbers(make_stream(source, tokenizer, rank=rank, world_size=3), tokenizer) for rank in range(3)]
    assert [len(shard) for shard in shards] == [8, 8, 8]
    assert sorted(sum(shards, [])) == list(range(24))
    write_llava_parquet(captions_folder / "train-00002.parquet", [caption_row(24), caption_row(25)])  # 26 rows now
    source = LlavaParquet(str(captions_folder))
    shards = [stream_numbers(make_stream(source, tokenizer, rank=rank, world_size=3), tokenizer) for rank in range(3)]
    assert [len(shard) for shard in shards] == [8, 8, 8]  # equal steps on every rank: 2 samples wait for the next epoch
    assert len(set(sum(shards, []))) == 24


@pytest.fixture
def sources_folder(tmp_path):
    """4 sources of 64 rows, sorted by source as LLaVA-NeXT-Data's shards are: 2 shards, 16 row groups of 16 rows."""
    rows = [dict(caption_row(i), data_source=f"source {i // 64}") for i in range(256)]
    write_llava_parquet(tmp_path / "train-00000.parquet", rows[:128], row_group_size=16)
    write_llava_parquet(tmp_path / "train-00001.parquet", rows[128:], row_group_size=16)
    return tmp_path


def test_batches_mix_the_sources_of_a_source_sorted_dataset(sources_folder, tokenizer):
    source = LlavaParquet(str(sources_folder))

    def distance_from_shares(shuffle_chunks):
        """The mean over batches of the total variation distance between a batch's sources and their shares (1/4)."""
        distances = []
        for batch in make_stream(source, tokenizer, batch_size=16, shuffle_chunks=shuffle_chunks):
            sources = np.array(batch_numbers(batch, tokenizer)) // 64
            distances.append(sum(abs(np.mean(sources == s) - 0.25) for s in range(4)) / 2)
        return np.mean(distances)

    assert distance_from_shares(1) == 0.75  # a batch is one row group, so one source
    assert distance_from_shares(16) < 0.25  # drawn at random: 0.16 on average, at most 0.2 over 200 seeds
    # 4 windows of 4 random row groups (of the 16): each window mixes a few sources, less evenly than all 16
    assert distance_from_shares(16) < distance_from_shares(4) < 0.75


def test_mixed_batches_are_the_same_for_any_num_workers_and_resume_exactly(sources_folder, tokenizer):
    source = LlavaParquet(str(sources_folder))
    settings = dict(batch_size=12, shuffle_chunks=4)  # windows of 64 rows: some batches straddle two
    uninterrupted = [batch_numbers(batch, tokenizer) for batch in make_stream(source, tokenizer, **settings)]
    stream, seen = make_stream(source, tokenizer, num_workers=2, **settings), []
    for batch in stream:
        seen.append(batch_numbers(batch, tokenizer))
        if len(seen) == 7:  # sample 84, in the second window
            break
    resumed = make_stream(source, tokenizer, num_workers=2, **settings)
    resumed.load_state_dict(json.loads(json.dumps(stream.state_dict())))
    assert seen + [batch_numbers(batch, tokenizer) for batch in resumed] == uninterrupted
    assert len(set(sum(uninterrupted, []))) == 256
    shards = [stream_numbers(make_stream(source, tokenizer, rank=rank, world_size=2, **settings), tokenizer)
              for rank in range(2)]
    assert sorted(sum(shards, [])) == list(range(256))  # ranks take disjoint samples
    with pytest.raises(ValueError, match="shuffle_chunks"):
        make_stream(source, tokenizer, shuffle_chunks=16).load_state_dict(stream.state_dict())


class CountedParquet(LlavaParquet):
    def read(self, chunk, rows):
        self.reads.append(chunk)
        return super().read(chunk, rows)


def test_a_worker_reads_each_chunk_of_a_window_once(sources_folder, tokenizer, monkeypatch):
    source = CountedParquet(str(sources_folder))
    stream = make_stream(source, tokenizer, batch_size=6, shuffle_chunks=4)
    chunk_ids, row_ids, window_ids = shuffled_order(source.chunk_sizes, seed=0, epoch=0, window=4)
    window_of = dict(zip(chunk_ids.tolist(), window_ids.tolist()))
    for worker, batches in [(0, 22), (1, 21)]:  # worker w of 2 builds batches w, w + 2, ... of 43
        monkeypatch.setattr(data, "get_worker_info", lambda worker=worker: SimpleNamespace(id=worker, num_workers=2))
        source.reads = []
        assert len(list(WorkerBatches(stream, chunk_ids, row_ids, window_ids))) == batches
        assert sorted(source.reads) == list(range(16))  # its batches touch every window, and each chunk once
        assert [window_of[chunk] for chunk in source.reads] == sorted(window_of[chunk] for chunk in source.reads)


def test_an_indexed_source_makes_its_records_as_the_worker_gets_to_them(tokenizer):
    """Its one chunk is the whole source, so a window holds everything: records are made lazily, not held."""
    class Counted(IndexedSource):
        entries, made = range(40), 0

        def record(self, row):
            self.made += 1
            return {"name": str(row), "image": png(), "conversations": caption_row(row)["conversations"]}

    source = Counted()
    stream = make_stream(source, tokenizer, batch_size=8)
    batches = iter(WorkerBatches(stream, *shuffled_order(source.chunk_sizes, seed=0, epoch=0, window=16)))
    next(batches)
    assert source.made == 9  # the batch's 8, and the next one's first (where the batch is seen to end)
    assert len(list(batches)) == 4 and source.made == 40


# --- bad data -----------------------------------------------------------------------------------------------

def test_bad_rows_are_skipped_named_and_counted(tmp_path, tokenizer, caplog):
    rows = [caption_row(i) for i in range(16)]
    rows[3] = caption_row(3, image=b"\xff\xd8\xff not really a JPEG")
    rows[5] = caption_row(5, conversations=[{"from": "gpt", "value": "Caption number 5."}])
    rows[9]["image"] = None  # text-only, as some LLaVA-NeXT-Data rows are
    write_llava_parquet(tmp_path / "shard.parquet", rows)
    stream = make_stream(LlavaParquet(str(tmp_path)), tokenizer, max_skip_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="data"):
        numbers = stream_numbers(stream, tokenizer)
    assert sorted(numbers) == [i for i in range(16) if i not in (3, 5, 9)]
    assert "shard.parquet row 3 (id 000000000003)" in caplog.text and "cannot read image" in caplog.text
    assert "shard.parquet row 5 (id 000000000005): every turn is from 'gpt'" in caplog.text
    assert stream.state_dict()["counts"] == {"skipped": 2, "text_only": 1, "truncated": 0}


def test_too_many_bad_rows_is_an_error(tmp_path, tokenizer):
    rows = [caption_row(i, image=b"garbage" if i % 4 == 0 else None) for i in range(16)]  # 4 of 16 bad
    write_llava_parquet(tmp_path / "shard.parquet", rows)
    with pytest.raises(RuntimeError, match="max_skip_fraction=0.1"):
        stream_numbers(make_stream(LlavaParquet(str(tmp_path)), tokenizer, max_skip_fraction=0.1), tokenizer)


def test_missing_image_file_is_skipped_naming_the_file(tmp_path, tokenizer, caplog):
    (tmp_path / "there.png").write_bytes(png())
    entries = [{"id": "a", "image": "there.png", "conversations": TWO_TURNS},
               {"id": "b", "image": "gone.png", "conversations": TWO_TURNS}]
    (tmp_path / "data.json").write_text(json.dumps(entries))
    stream = make_stream(LlavaJson(str(tmp_path / "data.json"), str(tmp_path)), tokenizer, max_skip_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="data"):
        batches = list(stream)
    assert sum(len(micro_batch["input_ids"]) for batch in batches for micro_batch in batch) == 1
    assert "gone.png" in caplog.text and stream.counts["skipped"] == 1


def test_truncated_parquet_file_is_an_error_naming_it(tmp_path):
    path = write_llava_parquet(tmp_path / "cut.parquet", [caption_row(i) for i in range(16)])
    path.write_bytes(path.read_bytes()[:-100])  # a download cut short: the footer is gone
    with pytest.raises(OSError, match="cut.parquet is not a readable parquet file"):
        LlavaParquet(str(tmp_path))


def test_text_that_is_not_utf8_is_an_error_naming_the_file_and_row_group(tmp_path):
    rows = [caption_row(i) for i in range(8)]
    table = pa.Table.from_pylist(rows, schema=LLAVA_SCHEMA)
    broken_ids = pa.array([b"\xff not utf-8"] + [r["id"].encode() for r in rows[1:]], pa.binary()).view(pa.string())
    pq.write_table(table.set_column(0, "id", broken_ids), tmp_path / "bad.parquet")
    with pytest.raises(OSError, match="bad.parquet: cannot read row group 0"):
        LlavaParquet(str(tmp_path)).read(0, [0, 1])


def test_llava_json_entries_that_are_not_objects_are_an_error_naming_the_first(tmp_path):
    entries = [{"id": "1", "image": "1.png", "conversations": TWO_TURNS}, "oops", None]
    (tmp_path / "data.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"data.json: 2 entries are not objects .* the first at index 1: 'oops'"):
        LlavaJson(str(tmp_path / "data.json"), str(tmp_path))


def test_an_epoch_with_nothing_to_train_on_is_an_error_not_an_endless_loop(tmp_path, tokenizer):
    entries = [{"id": str(i), "images": f"{i}.png", "conversations": TWO_TURNS} for i in range(4)]  # "images": a typo
    (tmp_path / "data.json").write_text(json.dumps(entries))
    stream = make_stream(LlavaJson(str(tmp_path / "data.json"), str(tmp_path)), tokenizer)
    with pytest.raises(RuntimeError, match="epoch 0 of 4 samples gave none to train on .*4 rows without an image"):
        list(stream)


def test_a_split_of_a_hub_dataset_is_fetched_from_the_repos_data_folder(tmp_path, monkeypatch):
    """Hub datasets keep their shards as data/{split}-NNNNN-of-NNNNN.parquet; only the split's files download
    (the Hub's own pattern matching decides which, as snapshot_download would)."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects
    repo = ["README.md", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
            "data/test-00000-of-00001.parquet"]

    def snapshot_download(repo_id, repo_type, allow_patterns):
        for name in filter_repo_objects(repo, allow_patterns=allow_patterns):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            write_llava_parquet(tmp_path / name, [caption_row(0)])
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    source = LlavaParquet("owner/dataset", pattern="train-*.parquet")
    assert [os.path.relpath(path, tmp_path) for path, _, _ in source.chunks] == repo[1:3]


def test_a_missing_folder_is_reported_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """What cannot be a Hub repo id (an absolute path, ./x) or starts in a folder that exists here (data/recap,
    a typo for data/ReCap) is a local folder that is not there; the Hub is never asked about it."""
    from model import Qwen2
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    for missing in (str(tmp_path / "no_such_folder"), "./no_such_folder", "data/recap"):
        with pytest.raises(FileNotFoundError, match=f"{missing}: no such folder"):
            LlavaParquet(missing)
    with pytest.raises(FileNotFoundError, match="data/qwen: no such folder"):
        Qwen2.from_pretrained("data/qwen")
    with pytest.raises(FileNotFoundError, match=r"no \*.parquet files"):
        LlavaParquet(str(tmp_path))


def test_truncated_texts_are_counted(tmp_path, tokenizer):
    write_llava_parquet(tmp_path / "shard.parquet", [caption_row(i) for i in range(8)])
    full_length = len(encode_conversation(tokenizer, caption_row(0)["conversations"])[0])
    cut_into_answer = full_length - 3
    stream = make_stream(LlavaParquet(str(tmp_path)), tokenizer, max_text_tokens=cut_into_answer)
    # rows of [1 image slot | text] (make_stream's n_image_tokens)
    assert {micro_batch["input_ids"].shape[1] for batch in stream for micro_batch in batch} == {1 + cut_into_answer}
    assert stream.counts == {"skipped": 0, "text_only": 0, "truncated": 8}


def test_a_batch_holds_the_clean_text_and_the_preprocessed_image(tokenizer):
    """No stage-0 noise here: the model applies it (masks.add_noise), so labels and inputs stay clean."""
    source = SyntheticShapes(1, image_size=32, questions=2)
    [[batch]] = make_stream(source, tokenizer, image_size=32)  # one batch of one micro-batch
    input_ids, labels = encode_conversation(tokenizer, source.record(0)["conversations"])
    image_slot = [tokenizer.pad_id], [IGNORE_INDEX]  # make_stream's one image slot leads the row
    assert batch["input_ids"].tolist() == [image_slot[0] + input_ids] and batch["labels"].tolist() == [image_slot[1] + labels]
    assert torch.equal(batch["pixel_values"][0], preprocess_image(source.record(0)["image"], image_size=32))


def test_a_batch_is_one_optimizer_step_in_micro_batches(tokenizer):
    stream = make_stream(SyntheticShapes(10, image_size=32, questions=1), tokenizer, batch_size=4, micro_batch=2,
                         image_size=32)
    batches = list(stream)
    assert [[len(micro_batch["input_ids"]) for micro_batch in batch] for batch in batches] == [[2, 2], [2, 2], [2]]
    assert len(stream) == 3  # batches (optimizer steps) per epoch
    assert batches[0][0]["pixel_values"].shape == (2, 3, 32, 32)
    assert (batches[0][0]["labels"] != IGNORE_INDEX).sum(1).min() > 0


def test_packed_stream_puts_several_conversations_in_a_row(tokenizer):
    """With pack_length, a batch's conversations share rows; a micro-batch has at most as many tokens as
    micro_batch padded samples of max_text_tokens: 4 x (4 + 60) = 256 tokens, 2 rows of 128."""
    shapes = SyntheticShapes(24, image_size=32, questions=2)
    settings = dict(image_size=32, num_workers=0, max_text_tokens=60)
    [padded] = next(iter(BatchStream(shapes, tokenizer, 8, 4, **settings)))
    stream = BatchStream(shapes, tokenizer, 8, 4, micro_batch=4, **settings, pack_length=128)
    packed = next(iter(stream))
    assert stream.pack_rows == 2 and all(len(micro_batch["input_ids"]) <= 2 for micro_batch in packed)
    assert sum(len(micro_batch["pixel_values"]) for micro_batch in packed) == 8  # every conversation, once
    assert sum(len(micro_batch["input_ids"]) for micro_batch in packed) < 8        # in fewer rows than samples
    kept = sum(int((micro_batch["document"] >= 0).sum()) for micro_batch in packed)
    assert kept == (padded["document"] >= 0).sum()  # every token kept
    labels = torch.cat([micro_batch["labels"].flatten() for micro_batch in packed])
    assert sorted(labels[labels != -100].tolist()) == sorted(padded["labels"][padded["labels"] != -100].tolist())
    with pytest.raises(ValueError, match="pack_length=63 cannot hold one sample"):
        BatchStream(shapes, tokenizer, 8, 4, **settings, pack_length=63)

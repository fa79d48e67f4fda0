"""Bad input named where it starts (issue 21's table): files that are not JSON, Karpathy files without the
wanted entries, image paths that are no regular file, an undecodable test image found before any captioning."""
import json
import os

import pytest

import eval as evaluation
from data import KarpathyCaptions, LlavaJson, load_image
from test_eval import karpathy_args, write_karpathy


def test_a_json_file_that_is_not_json_is_named(tmp_path):
    broken = tmp_path / "llava.json"
    broken.write_text('[{"id": 1, "image": "a.jpg", ')  # cut short
    with pytest.raises(ValueError, match=f"{broken} is not JSON"):
        LlavaJson(str(broken), str(tmp_path))
    with pytest.raises(ValueError, match=f"{broken} is not JSON"):
        KarpathyCaptions(str(broken), str(tmp_path))


def test_a_karpathy_entry_without_sentences_is_named(tmp_path):
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog."}]},
                                           {"filename": "b.jpg", "split": "restval"}]}))
    with pytest.raises(ValueError, match=r"1 entries lack a filename or sentences .* images\[1\]: .*b\.jpg"):
        KarpathyCaptions(str(path), str(tmp_path))


def test_a_karpathy_file_without_training_images_lists_its_splits(tmp_path):
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": "A dog."}]}]}))
    with pytest.raises(ValueError, match=r"has no restval or train images; its splits are \['test'\]"):
        KarpathyCaptions(str(path), str(tmp_path))
    assert len(KarpathyCaptions(str(path), str(tmp_path), split="test")) == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are a POSIX thing")
def test_an_image_path_that_is_no_regular_file_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "image.jpg"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    with pytest.raises(ValueError, match="is not a regular file"):
        load_image(str(fifo), "row 3")
    with pytest.raises(ValueError, match="is not a regular file"):
        load_image(str(tmp_path), "row 4")  # a folder


def test_eval_decodes_every_test_image_before_captioning_any(tmp_path, monkeypatch):
    write_karpathy(tmp_path, "flickr8k", n_test=3)
    (tmp_path / "images" / "flickr8k" / "flickr8k_2.png").write_bytes(b"not an image")  # the last test image
    answered = []
    monkeypatch.setattr(evaluation, "answer", lambda *args, **kwargs: answered.append(1) or ["a caption."] * 2)
    with pytest.raises(ValueError, match=r"1 of the 3 images cannot be read, .*flickr8k_2\.png"):
        evaluation.main(karpathy_args(tmp_path, "--datasets", "flickr8k", "--backbones", "--out_dir", str(tmp_path)))
    assert answered == []


def test_a_dataset_whose_image_cells_are_mostly_empty_stops_naming_the_count(tmp_path):
    """Rows without an image are skipped (every sequence starts with one, paper 3.1) and counted; past
    max_text_only_fraction the run stops instead of training on what is left, as if nothing were wrong."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import tiny_tokenizer
    from data import BatchStream, LlavaParquet
    from test_data import LLAVA_SCHEMA, caption_row
    rows = [caption_row(i) for i in range(16)]
    for row in rows[:12]:
        row["image"] = None  # an image column that came out empty
    pq.write_table(pa.Table.from_pylist(rows, schema=LLAVA_SCHEMA), tmp_path / "shard.parquet", row_group_size=8)
    stream = lambda fraction: BatchStream(LlavaParquet(str(tmp_path)), tiny_tokenizer(), 4, 1, image_size=16,
                                          num_workers=0, max_text_only_fraction=fraction)
    with pytest.raises(RuntimeError, match=r"rows without an image .* more than max_text_only_fraction=0.1 of the 16"):
        list(stream(0.1))
    assert sum(len(batch[0]["pixel_values"]) for batch in stream(0.8)) == 4  # the 4 rows with an image

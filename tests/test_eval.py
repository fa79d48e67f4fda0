"""eval.py: caption scoring checked against another paper's published scores, PathVQA metrics on hand-made
answers, the clear errors, and the captioning loop end to end on a tiny random model."""
import gzip
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import sample
from data import SHORT_CAPTION_PROMPT
from eval import format_table, image_id, karpathy_samples, normalize_answer, pathvqa_metrics, ptb_tokenize, score
from eval import main as eval_main
from conftest import CAPTIONS, save_image, save_tiny_checkpoint

REPO = Path(__file__).parents[1]
PUBLISHED = Path(__file__).parent / "published"  # another paper's outputs and their references: see its README.md


def read_json_gz(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def read_published(name):
    """MAGIC's published predictions for the Karpathy test split of `name` and the references of exactly
    the predicted images (the authors scored 4982 of the 5000 COCO images)."""
    published = read_json_gz(PUBLISHED / f"{name}_test_pred_magic.json.gz")
    predictions = {p["image_id"]: p["caption"] for p in published}
    references = defaultdict(list)
    for annotation in read_json_gz(PUBLISHED / f"{name}_karpathy_test_gt.json.gz")["annotations"]:
        if annotation["image_id"] in predictions:
            references[annotation["image_id"]].append(annotation["caption"])
    return predictions, dict(references)


# Scoring the whole split takes about 12 s (COCO, 4982 images; mostly METEOR) and 7 s (Flickr30k) on 2 cores:
# done once per module.
@pytest.fixture(scope="module")
def coco_scores():
    return score(*read_published("coco"))


@pytest.fixture(scope="module")
def flickr30k_scores():
    return score(*read_published("flickr30k"))


# The MAGIC authors' console output (their evaluation_result.png), to the places they printed: Bleu_1..3 to
# 3 places, the rest to 4 places as recomputed with pycocoevalcap 1.2 (published/README.md).
COCO_PUBLISHED = {"Bleu_1": 0.568, "Bleu_2": 0.358, "Bleu_3": 0.214,
                  "Bleu_4": 0.1288, "METEOR": 0.1736, "ROUGE_L": 0.3988, "CIDEr": 0.4929}
FLICKR30K_PUBLISHED = {"Bleu_1": 0.4450, "Bleu_4": 0.0643, "METEOR": 0.1308, "ROUGE_L": 0.3157, "CIDEr": 0.2037}


@pytest.mark.parametrize("metric", COCO_PUBLISHED)
def test_score_reproduces_published_coco_scores(coco_scores, metric):
    places = len(str(COCO_PUBLISHED[metric]).split(".")[1])
    assert round(coco_scores[metric], places) == COCO_PUBLISHED[metric]


@pytest.mark.parametrize("metric", FLICKR30K_PUBLISHED)
def test_score_reproduces_published_flickr30k_scores(flickr30k_scores, metric):
    assert round(flickr30k_scores[metric], 4) == FLICKR30K_PUBLISHED[metric]


# What the authors themselves reported, at their own precision: COCO in their console output (3 places), Flickr30k
# in MAGIC's Table 1 (percent, one place). The four-place values above pin the same scores more finely.
COCO_AUTHORS = {"Bleu_1": 0.568, "Bleu_2": 0.358, "Bleu_3": 0.214, "Bleu_4": 0.129, "METEOR": 0.174, "ROUGE_L": 0.399,
                "CIDEr": 0.493}
FLICKR30K_TABLE_1 = {"Bleu_1": 44.5, "Bleu_4": 6.4, "METEOR": 13.1, "ROUGE_L": 31.6, "CIDEr": 20.4}


def test_score_gives_what_magics_authors_reported(coco_scores, flickr30k_scores):
    assert {metric: round(coco_scores[metric], 3) for metric in COCO_AUTHORS} == COCO_AUTHORS
    assert {metric: round(100 * flickr30k_scores[metric], 1) for metric in FLICKR30K_TABLE_1} == FLICKR30K_TABLE_1


def test_score_returns_pycocoevalcap_metric_names(coco_scores):
    assert list(coco_scores) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]


def test_table_has_a_column_per_dataset_at_paper_scale(coco_scores, flickr30k_scores):
    table = format_table({"flickr30k": flickr30k_scores, "coco": coco_scores}).splitlines()
    assert table[0].split() == ["Metric", "flickr30k", "coco"]
    cider = table[-1].split()
    assert cider == ["CIDEr", f"{100 * flickr30k_scores['CIDEr']:.1f}", f"{100 * coco_scores['CIDEr']:.1f}"]


def test_a_carriage_return_in_a_caption_does_not_shift_later_captions():
    """Java's PTBTokenizer breaks lines at \\r; passed through, image 2 would get the tail of image 1."""
    tokenized = ptb_tokenize({1: ["A cat\ron a mat."], 2: ["A dog, in a park!"]})
    assert tokenized == {1: ["a cat on a mat"], 2: ["a dog in a park"]}


def test_score_refuses_predictions_and_references_for_different_images():
    with pytest.raises(ValueError, match="same images"):
        score({1: "a cat"}, {1: ["a cat"], 2: ["a dog"]})


def test_score_without_java_says_so(monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match="needs Java"):
        score({1: "a cat"}, {1: ["a cat"]})


def test_spice_offline_fails_with_a_clear_message(monkeypatch):
    from pycocoevalcap.spice import spice

    def no_internet():
        raise OSError("network unreachable")
    monkeypatch.setattr(spice, "get_stanford_models", no_internet)
    with pytest.raises(RuntimeError, match="SPICE needs Stanford CoreNLP"):
        score({1: "a cat"}, {1: ["a cat"]}, spice=True)


# ----------------------------------------------------------------------------------------------------
# PathVQA

def test_normalize_answer_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The Nucleus,  of an   Epithelial cell! ") == "nucleus of epithelial cell"


def test_pathvqa_metrics_on_hand_made_answers():
    answers = ["yes", "no", "No", "yes", "hemorrhage", "the liver", "squamous cell carcinoma"]
    predictions = ["Yes, it does.", "no", "yes", "nope", "Hemorrhage.", "liver", "carcinoma"]
    #               right           right  wrong  wrong   right          right    wrong
    metrics = pathvqa_metrics(predictions, answers)
    assert metrics["n_yes_no"] == 4 and metrics["n_open"] == 3
    assert metrics["yes_no_accuracy"] == 2 / 4
    assert metrics["open_exact_match"] == 2 / 3
    assert metrics["overall_accuracy"] == 4 / 7


def test_pathvqa_metrics_without_open_questions_reports_none_for_them():
    metrics = pathvqa_metrics(["yes"], ["yes"])
    assert metrics["open_exact_match"] is None and metrics["yes_no_accuracy"] == 1.0


# ----------------------------------------------------------------------------------------------------
# eval.py end to end on a tiny random checkpoint and a small Karpathy-format fixture

def write_karpathy(root, dataset, n_test, filepath=None):
    """dataset_{dataset}.json with n_test test images, one val and one train image, and those images."""
    entries = []
    for i, split in enumerate(["test"] * n_test + ["val", "train"]):
        entry = {"filename": f"{dataset}_{i}.png", "split": split, "imgid": i, "sentids": [2 * i, 2 * i + 1],
                 "sentences": [{"raw": caption, "tokens": []} for caption in CAPTIONS[i:i + 5]]}
        if filepath:  # COCO's entries name their subfolder and carry the COCO image id
            entry.update(filepath=filepath, cocoid=1000 + i)
        entries.append(entry)
        folder = root / "images" / dataset / (filepath or "")
        folder.mkdir(parents=True, exist_ok=True)
        save_image(folder / entry["filename"], seed=i)
    (root / "karpathy").mkdir(exist_ok=True)
    (root / "karpathy" / f"dataset_{dataset}.json").write_text(json.dumps({"images": entries, "dataset": dataset}))


@pytest.fixture(scope="module")
def karpathy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("karpathy")
    write_karpathy(root, "coco", n_test=3, filepath="val2014")
    write_karpathy(root, "flickr8k", n_test=2)
    return root


def karpathy_args(root, *more):
    return ["--split", "karpathy", "--karpathy_dir", str(root / "karpathy"), "--image_root", str(root / "images"),
            "--device", "cpu", "--max_new_tokens", "6", *more]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, karpathy_root):
    """One run of `python eval.py --split karpathy` on COCO and Flickr8k; returns its out_dir and scores."""
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    out_dir = tmp_path_factory.mktemp("eval_out")
    scores = eval_main(karpathy_args(karpathy_root, "--datasets", "coco,flickr8k", "--checkpoint", str(checkpoint),
                                     "--batch_size", "2", "--out_dir", str(out_dir)))
    return out_dir, scores, checkpoint


def test_eval_writes_coco_format_captions_of_the_test_split(evaluated):
    out_dir, _, _ = evaluated
    coco = json.loads((out_dir / "captions_coco_karpathy.json").read_text())
    flickr = json.loads((out_dir / "captions_flickr8k_karpathy.json").read_text())
    assert [c["image_id"] for c in coco] == [1000, 1001, 1002]  # the COCO ids of the 3 test images
    assert [c["image_id"] for c in flickr] == ["flickr8k_0", "flickr8k_1"]  # Flickr: the file name without .png
    assert all(isinstance(c["caption"], str) for c in coco + flickr)


def test_eval_metrics_file_holds_score_of_the_written_captions(evaluated, karpathy_root):
    out_dir, returned, _ = evaluated
    for dataset in ("coco", "flickr8k"):  # a file each: evaluating one dataset later leaves the other's be
        written = json.loads((out_dir / f"metrics_{dataset}_karpathy.json").read_text())
        assert written["dataset"] == dataset and written["settings"]["num_beams"] == 1
        captions = json.loads((out_dir / f"captions_{dataset}_karpathy.json").read_text())
        predictions = {c["image_id"]: c["caption"] for c in captions}
        images = json.loads((karpathy_root / "karpathy" / f"dataset_{dataset}.json").read_text())["images"]
        references = {c["image_id"]: [s["raw"] for s in image["sentences"]] for c, image in zip(captions, images)}
        assert written["scores"] == returned[dataset] == score(predictions, references)
    assert returned["coco"]["Bleu_1"] > 0  # some words of the random captions are in the references


def test_eval_captions_are_the_models_greedy_answers(evaluated, karpathy_root):
    """The captions are what sample.py answers for the same image and prompt."""
    out_dir, _, checkpoint = evaluated
    image = karpathy_root / "images" / "flickr8k" / "flickr8k_1.png"
    expected = sample.main(["--checkpoint", str(checkpoint), "--device", "cpu", "--max_new_tokens", "6",
                            "--image", str(image), "--prompt", SHORT_CAPTION_PROMPT])
    captions = json.loads((out_dir / "captions_flickr8k_karpathy.json").read_text())
    assert captions[1]["caption"] == expected[0]


def test_eval_under_torchrun_gives_the_single_process_captions(evaluated, karpathy_root, tmp_path):
    """Two CPU ranks (gloo) each caption half of the images; rank 0 gathers, scores and writes."""
    out_dir, _, checkpoint = evaluated
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "eval.py",
               *karpathy_args(karpathy_root, "--datasets", "coco", "--checkpoint", str(checkpoint),
                              "--batch_size", "2", "--out_dir", str(tmp_path))]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=300)
    assert (json.loads((tmp_path / "captions_coco_karpathy.json").read_text())
            == json.loads((out_dir / "captions_coco_karpathy.json").read_text()))


def test_missing_karpathy_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset_flickr30k.json"):
        karpathy_samples(str(tmp_path), "flickr30k", "karpathy", str(tmp_path), "caption")


def test_missing_images_are_named(karpathy_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"3 of the 3 images .*coco_0\.png"):
        karpathy_samples(str(karpathy_root / "karpathy"), "coco", "test", str(tmp_path), "caption")


def test_a_split_that_does_not_exist_lists_the_real_ones(karpathy_root):
    with pytest.raises(ValueError, match=r"no split 'testing'.*\['test', 'train', 'val'\]"):
        karpathy_samples(str(karpathy_root / "karpathy"), "coco", "testing", str(karpathy_root / "images"), "caption")


@pytest.mark.parametrize("content, problem", [('{"images": [{"split": "test", "filename": "a.jpg"}]}', "KeyError.'sentences'"),
                                              ('[{"split": "test"}]', "TypeError"),
                                              ('{"images": [', "JSONDecodeError")])
def test_a_file_not_laid_out_as_karpathys_is_named_with_what_is_wrong(tmp_path, content, problem):
    (tmp_path / "dataset_coco.json").write_text(content)
    with pytest.raises(ValueError, match=rf"dataset_coco.json is not laid out as Karpathy's split files .*{problem}"):
        karpathy_samples(str(tmp_path), "coco", "karpathy", str(tmp_path), "caption")


def test_karpathy_means_the_test_split_and_other_splits_work_too(karpathy_root):
    def keys(split):
        samples = karpathy_samples(str(karpathy_root / "karpathy"), "coco", split, str(karpathy_root / "images"), "p")
        return [s["key"] for s in samples]
    assert keys("karpathy") == [1000, 1001, 1002]
    assert keys("val") == [1003]


def test_image_ids_match_coco_format_reference_files():
    assert image_id({"cocoid": 391895, "filename": "COCO_val2014_000000391895.jpg"}) == 391895
    assert image_id({"filename": "1000092795.jpg"}) == 1000092795  # Flickr30k
    assert image_id({"filename": "1000268201_693b08cb0e.jpg"}) == "1000268201_693b08cb0e"  # Flickr8k


def test_captions_are_asked_as_the_coco_fine_tune_was_trained_and_decoded_greedily(karpathy_root):
    """The default instruction is config/caption_coco.py's training one (data.KarpathyCaptions's), so full-shot
    COCO asks what was trained and zero-shot Flickr asks what published harnesses ask; --prompt changes it. The
    README states the decoding defaults: greedy, at most 30 new tokens."""
    import inspect
    from data import KarpathyCaptions
    from eval import parse_args
    args = parse_args(["--backbones"])
    assert args.prompt == "Provide a one-sentence caption for the provided image."
    assert args.prompt == inspect.signature(KarpathyCaptions).parameters["prompt"].default
    assert (args.num_beams, args.max_new_tokens) == (1, 30)
    samples = karpathy_samples(str(karpathy_root / "karpathy"), "flickr8k", "karpathy", str(karpathy_root / "images"),
                               args.prompt)
    assert {s["prompt"] for s in samples} == {"Provide a one-sentence caption for the provided image."}
    assert parse_args(["--backbones", "--prompt", "Caption it."]).prompt == "Caption it."


def test_a_runs_out_dir_stands_for_its_newest_checkpoint(tmp_path):
    """The scores and their settings name the checkpoint that was scored, not a folder that moves on. They go
    beside it, not into it: train.py deletes a run's older step-N folders as it trains on."""
    from eval import parse_args
    (tmp_path / "step-0000500").mkdir()
    (tmp_path / "step-0000500" / "config.json").write_text("{}")
    (tmp_path / "latest").write_text("step-0000500")
    args = parse_args(["--checkpoint", str(tmp_path)])
    assert args.checkpoint == str(tmp_path / "step-0000500")
    assert args.out_dir == str(tmp_path / "eval" / "step-0000500")
    assert parse_args(["--backbones"]).out_dir == "out-eval"  # the pretrained backbones, no checkpoint


def test_without_a_checkpoint_the_newest_of_the_recipes_last_stage_is_evaluated(tmp_path, monkeypatch, capsys):
    """`python eval.py --split karpathy` scores the newest checkpoint in config/stage3.py's out_dir, and says COCO
    is then zero-shot; `--task pathvqa` scores config/pathvqa.py's."""
    import eval
    import train
    from configurator import configure
    for task, config in [("caption", "stage3.py"), ("pathvqa", "pathvqa.py")]:
        assert eval.LAST_STAGE[task] == configure(dict(train.settings), [str(REPO / "config" / config)])["out_dir"]
    monkeypatch.chdir(tmp_path)
    for run in ("stage3", "pathvqa"):
        (tmp_path / "out" / run / "step-0000007").mkdir(parents=True)
        (tmp_path / "out" / run / "step-0000007" / "config.json").write_text("{}")
        (tmp_path / "out" / run / "latest").write_text("step-0000007")
    args = eval.parse_args(["--split", "karpathy"])
    assert args.checkpoint == os.path.join("out", "stage3", "step-0000007") and not args.backbones
    assert args.out_dir == os.path.join("out", "stage3", "eval", "step-0000007")
    assert "zero-shot on COCO too" in capsys.readouterr().out
    args = eval.parse_args(["--task", "pathvqa", "--pathvqa_parquet", "test.parquet"])
    assert args.checkpoint == os.path.join("out", "pathvqa", "step-0000007")


def test_without_a_checkpoint_or_a_trained_last_stage_it_says_what_to_pass(tmp_path, monkeypatch, capsys):
    """Nothing trained yet: a message naming --checkpoint (and --backbones), not scores of an untrained projector."""
    from eval import parse_args
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        parse_args(["--split", "karpathy"])
    error = capsys.readouterr().err
    assert "no checkpoint in out/stage3" in error and "pass --checkpoint" in error and "--backbones" in error


def test_the_untrained_projector_is_scored_only_when_asked(tmp_path, monkeypatch, capsys):
    """--backbones scores the pretrained backbones joined by an untrained projector (sample.load_model without a
    checkpoint); with --checkpoint as well it is refused, as the two name different models."""
    from eval import parse_args
    monkeypatch.chdir(tmp_path)
    assert parse_args(["--backbones"]).checkpoint is None
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        parse_args(["--backbones", "--checkpoint", str(tmp_path)])
    assert "pass one of them" in capsys.readouterr().err


def test_greedy_and_beam_search_results_are_kept_apart():
    from eval import parse_args, result_path
    greedy = parse_args(["--backbones", "--out_dir", "o"])
    beams = parse_args(["--backbones", "--out_dir", "o", "--num_beams", "3"])
    assert result_path(greedy, "metrics", "coco_test") == os.path.join("o", "metrics_coco_test.json")
    assert result_path(beams, "metrics", "coco_test") == os.path.join("o", "metrics_coco_test_beams3.json")


def test_unknown_dataset_is_refused(capsys):
    with pytest.raises(SystemExit):
        eval_main(["--datasets", "coco,mscoco"])
    assert "unknown datasets ['mscoco']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["--datasets", ","])
    assert "--datasets names no dataset" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--num_beams", "0"], ["--max_new_tokens", "-1"], ["--batch_size", "0"]])
def test_counts_below_one_are_refused_before_anything_runs(capsys, option):
    with pytest.raises(SystemExit):
        eval_main(option)
    assert f"argument {option[0]}: must be at least 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# eval.py --task pathvqa end to end

def write_pathvqa(path, questions, answers, first_seed=0):
    images = [Path(save_image(path.parent / f"{first_seed + i}.png", seed=first_seed + i)).read_bytes()
              for i in range(len(questions))]
    pq.write_table(pa.table({"image": [{"bytes": image, "path": None} for image in images],
                             "question": questions, "answer": answers}), path)


def test_pathvqa_task_writes_answers_and_their_metrics(evaluated, tmp_path):
    """A folder like the Hub repo's data/: only the test-*.parquet files are evaluated."""
    _, _, checkpoint = evaluated
    questions = ["is there a nucleus?", "what organ is this?", "is this tissue normal?"]
    answers = ["yes", "liver", "no"]
    write_pathvqa(tmp_path / "test-00000-of-00001.parquet", questions, answers)
    write_pathvqa(tmp_path / "train-00000-of-00001.parquet", ["is this a train question?"], ["yes"], first_seed=3)
    metrics = eval_main(["--task", "pathvqa", "--pathvqa_parquet", str(tmp_path), "--checkpoint", str(checkpoint),
                         "--device", "cpu", "--max_new_tokens", "4", "--batch_size", "2", "--out_dir", str(tmp_path)])
    rows = json.loads((tmp_path / "answers_pathvqa_test.json").read_text())
    assert [(r["question"], r["answer"]) for r in rows] == list(zip(questions, answers))
    assert metrics == pathvqa_metrics([r["prediction"] for r in rows], [r["answer"] for r in rows])
    assert json.loads((tmp_path / "metrics_pathvqa_test.json").read_text())["scores"] == metrics
    assert metrics["n_yes_no"] == 2 and metrics["n_open"] == 1


def test_missing_pathvqa_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="test.parquet"):
        eval_main(["--task", "pathvqa", "--pathvqa_parquet", str(tmp_path / "test.parquet"), "--backbones"])


def test_pathvqa_rows_without_an_image_are_found_before_any_answering(tmp_path):
    write_pathvqa(tmp_path / "test-0.parquet", ["is there a nucleus?", "what organ is this?"], ["yes", "liver"])
    table = pq.read_table(tmp_path / "test-0.parquet")
    images = table.column("image").to_pylist()
    images[1] = None
    pq.write_table(table.set_column(0, "image", pa.array(images, table.schema.field("image").type)),
                   tmp_path / "test-0.parquet")
    with pytest.raises(ValueError, match=r"1 PathVQA rows have no image, e.g. \['.*test-0.parquet row 1'\]"):
        eval_main(["--task", "pathvqa", "--pathvqa_parquet", str(tmp_path), "--backbones"])


def test_pathvqa_rows_without_an_answer_are_found_before_any_answering(tmp_path):
    write_pathvqa(tmp_path / "test-0.parquet", ["is there a nucleus?", "what organ is this?"], ["yes", None])
    with pytest.raises(ValueError, match=r"1 PathVQA rows lack a question or answer, e.g. \['.*test-0.parquet row 1'\]"):
        eval_main(["--task", "pathvqa", "--pathvqa_parquet", str(tmp_path), "--backbones"])

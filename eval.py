"""Evaluation: image captioning on the Karpathy test splits (paper 4.4, Table 6) and PathVQA (paper 4.5; its
metrics are ours: the paper's Table 9 shows examples only). Table 6's COCO column is full-shot (a checkpoint of
config/caption_coco.py), Flickr30k and Flickr8k are zero-shot: README, Evaluation.

    python eval.py --split karpathy              # COCO, Flickr30k, Flickr8k test; the newest checkpoint of out/stage3
    python eval.py --split karpathy --datasets coco --num_beams 3 --checkpoint out/stage2
    python eval.py --split karpathy --backbones  # the pretrained backbones joined by an untrained projector
    torchrun --nproc_per_node 8 eval.py --split karpathy  # each rank answers its share; rank 0 scores and writes
    python eval.py --task pathvqa --pathvqa_parquet data/path-vqa/test.parquet --checkpoint out/pathvqa

Without --checkpoint, the newest checkpoint of the recipe's last stage (config/stage3.py's out_dir) is evaluated.
The Karpathy test split has 5000 COCO, 1000 Flickr30k and 1000 Flickr8k images; the files' other splits work too:

    {karpathy_dir}/dataset_{coco,flickr30k,flickr8k}.json   Karpathy's caption_datasets.zip
    {image_root}/{dataset}/[{filepath}/]{filename}          as in those files (only COCO's entries have a filepath)
    so {image_root}/{dataset} is train.py's image_root for karpathy data, e.g. data/images/coco (a symlink will do).

Captions are scored as the COCO caption evaluation (pycocoevalcap, on Java) scores them: PTBTokenizer, then
BLEU-1..4, METEOR, ROUGE_L, CIDEr-D (and SPICE), printed like the paper's Table 6 (x100). Results go to --out_dir,
by default beside the checkpoint, out of the way of train.py's pruning; with --num_beams N > 1 names end in _beamsN:

    captions_{dataset}_{split}.json   COCO results format, [{"image_id", "caption"}]; image_id: COCO's image id,
                                      or the Flickr file name without extension (a number for Flickr30k)
    metrics_{dataset}_{split}.json    {"dataset", "settings", "scores": {metric: score}}, unscaled
    answers_pathvqa_{split}.json, metrics_pathvqa_{split}.json   for --task pathvqa (--pathvqa_split)"""
import argparse
import json
import os
import shutil
import string

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer import ptbtokenizer
from tqdm import tqdm

import distributed
from checkpoints import checkpoint_folder, latest_checkpoint
from data import SHORT_CAPTION_PROMPT, PathVQAParquet, load_image
from distributed import gather_from_ranks, rank, world_size
from sample import add_model_args, answer, at_least, load_model

DATASETS = ("coco", "flickr30k", "flickr8k")
KARPATHY_TEST = "test"  # what --split karpathy means
# evaluated without --checkpoint: the recipe's last stage (config/stage3.py's out_dir, zero-shot on every caption
# dataset; Table 6's COCO column is the full-shot fine-tune's, out/caption_coco) and PathVQA's fine-tune
LAST_STAGE = {"caption": "out/stage3", "pathvqa": "out/pathvqa"}


# caption metrics
def check_scoring_tools(spice=False):
    """Java (PTBTokenizer, METEOR and SPICE run on it) and a writable folder for PTBTokenizer's temporary files,
    which would otherwise fail with obscure errors; with spice=True, returns the SPICE scorer."""
    if shutil.which("java") is None:
        raise RuntimeError("caption scoring needs Java (pycocoevalcap runs PTBTokenizer and METEOR on it), "
                           "but no `java` is on PATH; install a JRE, e.g. `apt-get install default-jre-headless`")
    folder = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
    if not os.access(folder, os.W_OK):
        raise RuntimeError(f"pycocoevalcap's PTBTokenizer writes temporary files into {folder}, which is not "
                           "writable; install pycocoevalcap somewhere writable, e.g. in a virtual environment")
    try:  # SPICE downloads Stanford CoreNLP (about 400 MB) on first use, so it is opt-in and may fail offline
        return Spice() if spice else None
    except OSError as error:  # urllib's URLError is an OSError
        raise RuntimeError("SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads from nlp.stanford.edu on "
                           f"first use; the download failed ({error}): score without SPICE or once online") from error


def ptb_tokenize(captions):
    """{image_id: [caption, ...]} -> the same, lowercased, PTB-tokenized, punctuation removed. Java reads one
    caption per line and also breaks lines at \\r and other separators: whitespace is collapsed to single spaces
    first (no PTB token changes), or a caption holding one would shift every later caption onto the wrong image."""
    as_coco = {i: [{"caption": " ".join(caption.split())} for caption in caps] for i, caps in captions.items()}
    return ptbtokenizer.PTBTokenizer().tokenize(as_coco)


def score(predictions, references, spice=False):
    """COCO caption metrics of predictions {image_id: caption} against references {image_id: [captions]}: Bleu_1..4,
    METEOR, ROUGE_L, CIDEr (, SPICE), unscaled (CIDEr-D, similarities times 10, passes 1 for good captions; the rest in
    0-1). Both must cover the same images: CIDEr-D's IDF comes from the scored images' references."""
    if predictions.keys() != references.keys():
        unscored = sorted(map(str, references.keys() - predictions.keys()))
        unknown = sorted(map(str, predictions.keys() - references.keys()))
        raise ValueError(f"predictions and references must cover the same images; without a prediction: "
                         f"{unscored[:5]} ({len(unscored)}), without references: {unknown[:5]} ({len(unknown)})")
    spice_scorer = check_scoring_tools(spice)  # first: an offline failure comes before the slow part
    gts = ptb_tokenize(references)
    res = ptb_tokenize({i: [predictions[i]] for i in references})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"Bleu_{n}": b for n, b in enumerate(bleu, start=1)}
    scores["METEOR"], _ = Meteor().compute_score(gts, res)
    scores["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    scores["CIDEr"], _ = Cider().compute_score(gts, res)
    if spice:
        scores["SPICE"], _ = spice_scorer.compute_score(gts, res)
    return {name: float(value) for name, value in scores.items()}


def format_table(metrics):
    """{dataset: {metric: fraction}} -> a text table like the paper's Table 6 (metrics x datasets, x100)."""
    datasets = list(metrics)
    names = [name for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
             if name in metrics[datasets[0]]]
    lines = [f"{'Metric':<8}" + "".join(f"{dataset:>11}" for dataset in datasets)]
    for name in names:
        lines.append(f"{name:<8}" + "".join(f"{100 * metrics[dataset][name]:>11.1f}" for dataset in datasets))
    return "\n".join(lines)


# PathVQA metrics
def normalize_answer(text):
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (the SQuAD/VQA convention)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(word for word in text.split() if word not in ("a", "an", "the"))


def is_correct(prediction, truth):
    """Exact match after normalisation; a yes/no question by the prediction's first word ("Yes, it is." is "yes")."""
    prediction, truth = normalize_answer(prediction), normalize_answer(truth)
    if truth in ("yes", "no"):
        return prediction.split()[:1] == [truth]
    return prediction == truth


def pathvqa_metrics(predictions, truths):
    """Accuracy of predicted answers against the reference answers (two aligned lists of strings), on the
    yes/no questions, on the open questions (exact match), and on all of them (None where there are none)."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} answers")
    correct = [is_correct(p, t) for p, t in zip(predictions, truths)]
    yes_no = [c for c, t in zip(correct, truths) if normalize_answer(t) in ("yes", "no")]
    open_ended = [c for c, t in zip(correct, truths) if normalize_answer(t) not in ("yes", "no")]

    def mean(values):  # None (JSON null) when there is nothing to average
        return sum(values) / len(values) if values else None
    return {"yes_no_accuracy": mean(yes_no), "open_exact_match": mean(open_ended), "overall_accuracy": mean(correct),
            "n_yes_no": len(yes_no), "n_open": len(open_ended)}


# datasets: a list of samples {"key", "image" (path or bytes), "name" (for errors), "prompt", ...}
def karpathy_samples(karpathy_dir, dataset, split, image_root, prompt):
    """The images of one split of a Karpathy file, each with its reference captions."""
    path = os.path.join(karpathy_dir, f"dataset_{dataset}.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no Karpathy split file {path}: get dataset_{dataset}.json (from Karpathy's "
                                "caption_datasets.zip) and pass its folder as --karpathy_dir")
    wanted = KARPATHY_TEST if split == "karpathy" else split
    try:
        with open(path) as f:
            images = json.load(f)["images"]
        samples = [karpathy_sample(image, dataset, image_root, prompt) for image in images if image["split"] == wanted]
        splits = sorted({image["split"] for image in images})
    except (ValueError, KeyError, TypeError) as error:  # json's decoding errors are ValueErrors
        raise ValueError(f"{path} is not laid out as Karpathy's split files ({{'images': [{{'split', 'filename', "
                         f"'sentences': [{{'raw'}}]}}, ...]}}): {error!r}") from error
    if not samples:
        raise ValueError(f"{path} has no split {split!r}; its splits are {splits}, and 'karpathy' means {KARPATHY_TEST!r}")
    missing = [s["image"] for s in samples if not os.path.exists(s["image"])]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(samples)} images of {dataset} {wanted} are missing, "
                                f"e.g. {missing[:3]}; the layout eval.py expects is in its docstring")
    return samples


def karpathy_sample(image, dataset, image_root, prompt):
    path = os.path.join(image_root, dataset, image.get("filepath", ""), image["filename"])
    return {"key": image_id(image), "image": path, "name": path, "prompt": prompt,
            "references": [sentence["raw"] for sentence in image["sentences"]]}


def image_id(image):
    """The id that COCO-format reference files use: COCO's image id, else the file name without extension,
    as a number where it is one (Flickr30k: 1000092795.jpg -> 1000092795; Flickr8k keeps its names)."""
    if "cocoid" in image:
        return image["cocoid"]
    stem = os.path.splitext(image["filename"])[0]
    return int(stem) if stem.isdigit() else stem


def pathvqa_samples(path_or_repo, split):
    """PathVQA's questions with their answers, read as train.py reads them; the question is the prompt. Rows
    without an image, question or answer are found now, not after answering the rows before them."""
    if path_or_repo.endswith(".parquet") and not os.path.exists(path_or_repo):
        raise FileNotFoundError(f"no PathVQA parquet file {path_or_repo}")
    source = PathVQAParquet(path_or_repo, pattern=f"{split}-*.parquet")
    records = [record for chunk, size in enumerate(source.chunk_sizes)
               for record in source.read(chunk, list(range(size)))]
    without_image = [r["name"] for r in records if r["image"] is None]
    if without_image:
        raise ValueError(f"{len(without_image)} PathVQA rows have no image, e.g. {without_image[:3]}")
    not_text = [r["name"] for r in records if not all(isinstance(turn["value"], str) for turn in r["conversations"])]
    if not_text:
        raise ValueError(f"{len(not_text)} PathVQA rows lack a question or answer, e.g. {not_text[:3]}")
    return [{"key": i, "image": r["image"], "name": r["name"], "prompt": r["conversations"][0]["value"],
             "answer": r["conversations"][1]["value"]} for i, r in enumerate(records)]


def check_images(sample_lists, threads=8):
    """Decode every image before any is answered: an undecodable one stops the run now, named, with the others
    that fail, not when its batch comes up (every rank checks all of them, so that none waits on a failed one)."""
    from concurrent.futures import ThreadPoolExecutor

    def problem(sample):
        try:
            load_image(sample["image"], sample["name"])
        except ValueError as error:
            return str(error)
    samples = [sample for samples in sample_lists for sample in samples]
    with ThreadPoolExecutor(threads) as pool:  # PIL decodes with the GIL released
        problems = [p for p in pool.map(problem, samples) if p is not None]
    if problems:
        raise ValueError(f"{len(problems)} of the {len(samples)} images cannot be read, e.g. {problems[:3]}")


# the two tasks, the samples split over the ranks under torchrun
def answer_all(model, tokenizer, samples, args, desc):
    """{sample key: the model's answer} for every sample, on every rank; each answers every world_size-th one."""
    mine = samples[rank()::world_size()]
    predictions = {}
    for start in tqdm(range(0, len(mine), args.batch_size), desc=desc, unit="batch", disable=rank() != 0):
        batch = mine[start:start + args.batch_size]
        images = [load_image(sample["image"], sample["name"]) for sample in batch]
        texts = answer(model, tokenizer, images, [s["prompt"] for s in batch], args.max_new_tokens, args.num_beams)
        predictions.update(zip([sample["key"] for sample in batch], texts))
    return {key: text for part in gather_from_ranks(predictions) for key, text in part.items()}


def caption_all(model, tokenizer, per_dataset, args):
    """{dataset: {sample key: caption}} for the split of every dataset, on every rank."""
    return {dataset: answer_all(model, tokenizer, samples, args, desc=dataset) for dataset, samples in per_dataset.items()}


def score_captioning(captions, per_dataset, args):
    """Score every dataset's captions, print the table and write the captions and the metrics."""
    scores = {}
    for dataset, samples in per_dataset.items():
        write_json([{"image_id": s["key"], "caption": captions[dataset][s["key"]]} for s in samples],
                   result_path(args, "captions", f"{dataset}_{args.split}"))
        scores[dataset] = score(captions[dataset], {s["key"]: s["references"] for s in samples}, spice=args.spice)
        write_json({"dataset": dataset, "settings": settings(args), "scores": scores[dataset]},
                   result_path(args, "metrics", f"{dataset}_{args.split}"))
    print(format_table(scores))
    return scores


def score_pathvqa(predictions, samples, args):
    """Score the answers, print the metrics and write the answers and the metrics."""
    rows = [{"question": s["prompt"], "answer": s["answer"], "prediction": predictions[s["key"]]} for s in samples]
    metrics = pathvqa_metrics([row["prediction"] for row in rows], [row["answer"] for row in rows])
    print(json.dumps(metrics, indent=1))
    write_json(rows, result_path(args, "answers", f"pathvqa_{args.pathvqa_split}"))
    write_json({"settings": settings(args), "scores": metrics}, result_path(args, "metrics", f"pathvqa_{args.pathvqa_split}"))
    return metrics


def write_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    print("wrote", path)


def result_path(args, kind, name):
    """One file per dataset, split and decoding: another dataset, or beams, never overwrite an earlier result."""
    beams = f"_beams{args.num_beams}" if args.num_beams > 1 else ""
    return os.path.join(args.out_dir, f"{kind}_{name}{beams}.json")


def settings(args):
    """What produced the scores, saved beside them (the backbones only where no checkpoint was given)."""
    unused = ("device", "out_dir", "datasets") + (("vision", "language") if args.checkpoint else ())
    return {name: value for name, value in vars(args).items() if name not in unused}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="caption", choices=["caption", "pathvqa"])
    parser.add_argument("--split", default="karpathy", help="'karpathy' (= the Karpathy test split) or a split name")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated, from " + ",".join(DATASETS))
    parser.add_argument("--karpathy_dir", default="data/karpathy")
    parser.add_argument("--image_root", default="data/images")
    parser.add_argument("--prompt", default=SHORT_CAPTION_PROMPT,
                        help=f"default: {SHORT_CAPTION_PROMPT!r}, which config/caption_coco.py trains on")
    parser.add_argument("--pathvqa_parquet", default="data/path-vqa/test.parquet",
                        help="a PathVQA parquet file, a folder of them, or the Hub repo flaviagiammarino/path-vqa")
    parser.add_argument("--pathvqa_split", default="test", help="in a folder or repo, the files {split}-*.parquet")
    parser.add_argument("--batch_size", type=at_least(1), default=32)
    parser.add_argument("--spice", action="store_true", help="also score SPICE (downloads Stanford CoreNLP once)")
    parser.add_argument("--out_dir", help="default: eval/{checkpoint's name} beside the checkpoint, else out-eval")
    add_model_args(parser)
    parser.add_argument("--backbones", action="store_true", help="score the backbones joined by an untrained projector")
    args = parser.parse_args(argv)
    args.datasets = [name for name in args.datasets.split(",") if name]
    unknown = set(args.datasets) - set(DATASETS)
    if unknown or not args.datasets:
        parser.error(f"unknown datasets {sorted(unknown)}; choose from {','.join(DATASETS)}" if unknown
                     else f"--datasets names no dataset; choose from {','.join(DATASETS)}")
    if args.backbones and args.checkpoint:
        parser.error("--backbones scores the pretrained backbones, --checkpoint a checkpoint: pass one of them")
    if not args.backbones and not args.checkpoint:
        last = LAST_STAGE[args.task]
        if not latest_checkpoint(last):
            parser.error(f"no checkpoint in {last} (the recipe's last stage for --task {args.task}): pass "
                         "--checkpoint with a checkpoint or a training run's out_dir (or --backbones to score the "
                         "pretrained backbones joined by an untrained projector)")
        args.checkpoint = checkpoint_folder(last)
        print(f"evaluating {args.checkpoint}" + (" (zero-shot on COCO too: Table 6's COCO column is the full-shot "
                                                 "fine-tune's, --checkpoint out/caption_coco)" if args.task == "caption"
                                                 else ""), flush=True)
    folder, name = os.path.split(os.path.normpath(args.checkpoint or "."))
    args.out_dir = args.out_dir or (os.path.join(folder, "eval", name) if args.checkpoint else "out-eval")
    return args


def main(argv=None):
    """Returns the scores on rank 0 (None on the other ranks)."""
    args = parse_args(argv)
    # Everything that can go wrong with the data or the scoring tools fails now, not after an hour of captioning.
    if args.task == "caption":
        check_scoring_tools(args.spice)
        samples = {dataset: karpathy_samples(args.karpathy_dir, dataset, args.split, args.image_root, args.prompt)
                   for dataset in args.datasets}
    else:
        samples = pathvqa_samples(args.pathvqa_parquet, args.pathvqa_split)
    check_images(samples.values() if args.task == "caption" else [samples])
    model, tokenizer = load_model(args, distributed.setup(args.device))
    os.makedirs(args.out_dir, exist_ok=True)
    if args.task == "caption":
        answers = caption_all(model, tokenizer, samples, args)
    else:
        answers = answer_all(model, tokenizer, samples, args, desc="pathvqa")
    # The ranks part once every answer is gathered: rank 0 scores alone (minutes with SPICE), no rank waiting on it.
    first = rank() == 0
    distributed.teardown()
    if not first:
        return None
    return (score_captioning if args.task == "caption" else score_pathvqa)(answers, samples, args)

if __name__ == "__main__":
    main()

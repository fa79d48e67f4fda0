"""The paper's claims as experiments anyone can run on a laptop: each arm trained over several seeds, with error bars.

    python experiments.py                     # every experiment, 3 seeds each (<= 30 minutes on a 2-core CPU)
    python experiments.py masks               # one experiment: masks, stage0, align_first or captions
    python experiments.py --seeds=5 --jobs=1  # more seeds; one training at a time
    python experiments.py --quick             # tiny steps and evaluations: checks the runner, measures nothing
    python experiments.py --resume            # after an interruption: keep the trainings already finished

An arm is a recipe of stages, the paper's stages 0-2 at small sizes on the synthetic shapes (shapes.py: scenes of 1-3
shapes, captions, then questions on the whole image), each trained by train.py's own train_stage. Every arm is the
paper's recipe (recipe()) with one thing changed, at equal total steps, and starts where the paper does: from a
pretrained language model and vision encoder that never saw each other, and a new projector (pretrain(), join()).
Per experiment, out/experiments/<name>/ gets results.md (a table, mean ± std over the seeds), loss.png (the loss
curves, a band per arm) and results.json (every run's numbers). FINDINGS.md says what they show."""
import argparse
import json
import math
import multiprocessing
import os
import random
import statistics
import time
from contextlib import redirect_stderr, redirect_stdout

import torch
from PIL import Image, ImageDraw

import shapes
import train
from checkpoints import latest_checkpoint
from configurator import merged
from data import Tokenizer
from model import VLM
from sample import answer

# -----------------------------------------------------------------------------
# The small model and world: smaller than the demo's, so that 30 trainings fit in half an hour on two cores
SMALL = dict(
    vision_config=dict(image_size=48, patch_size=12, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4),
    language_config=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True),
    projector_hidden=64, data_format="synthetic", dataset="shapes", shapes_samples=20000, shapes_relations=True,
    max_text_tokens=96, pad_to_multiple=8, num_workers=0, device="cpu", dtype="float32", global_batch=32,
    micro_batch=32, warmup_steps=10, checkpoint_interval=10**9, stages=[], eval_after=False)
# The backbones, pretrained apart once as the paper's SigLIP and Qwen2.5 are (pretrain() says how); each seed joins
# them with its own new projector. Stages 0-2 train what the paper's do (Table 5), at rates for a small model.
LANGUAGE = dict(mask_kind="causal", vision_lr=0.0, projector_lr=0.0, language_lr=1e-3, shapes_captions="mixed",
                shapes_questions=2)
VISION = dict(mask_kind="causal", vision_lr=1e-3, projector_lr=1e-3, language_lr=1e-3, shapes_captions="mixed")
ALIGN = dict(vision_lr=0.0, projector_lr=1e-3, language_lr=0.0)  # stages 0-1: the projector alone (paper 3.4)
ALL = dict(vision_lr=1e-3, projector_lr=1e-3, language_lr=1e-3)  # stage 2: everything
STEPS = dict(language=400, vision=1500, align=60, train=450)  # pretraining; each of stages 0 and 1; stage 2
QUICK_STEPS = dict(language=3, vision=3, align=3, train=6)
EVAL_IMAGES, QUICK_EVAL_IMAGES = 100, 4  # heldout images captioned and questioned per run
FIXED_NOISE_TOKEN = 0  # <|endoftext|> in the shapes tokenizer, as in Qwen's (151643 at full size)


def recipe(steps, stage0=dict(noise_prob=0.2), mask="prefix", unfrozen=False, captions="consistent"):
    """An arm's stages: [(out_dir, settings)]. The paper's: stage 0 (bidirectional + 20% noise) and stage 1 (prefix),
    `align` steps each, captions, the projector alone training; then stage 2 (prefix), everything, captions and two
    questions per image. `mask`: that of stages 1-2; stage0=None: stage 1 takes stage 0's steps too; unfrozen: no
    stage 0, and everything trains from the start; captions: their style in every stage."""
    align, world = steps["align"], dict(shapes_captions=captions)
    if unfrozen:
        first = [("stage1", dict(mask_kind=mask, max_steps=2 * align, **ALL, **world))]
    elif stage0 is None:
        first = [("stage1", dict(mask_kind=mask, max_steps=2 * align, **ALIGN, **world))]
    else:
        first = [("stage0", dict(mask_kind="bidirectional", max_steps=align, **stage0, **ALIGN, **world)),
                 ("stage1", dict(mask_kind=mask, max_steps=align, **ALIGN, **world))]
    return first + [("stage2", dict(mask_kind=mask, max_steps=steps["train"], shapes_questions=2, **ALL,
                                    **world))]


def experiments(steps):
    """{name: (the claim, {arm: recipe})}; each experiment's first arm is the paper's choice."""
    return {
        "masks": ("1. The prefix mask (image tokens see each other) beats the causal mask (LLaVA); PaliGemma's "
                  "prefix over image + prompt, for comparison. The mask of stages 1-2.", {
                      "prefix (paper)": recipe(steps),
                      "causal (LLaVA)": recipe(steps, mask="causal"),
                      "prefix_prompt (PaliGemma)": recipe(steps, mask="prefix_prompt")}),
        "stage0": ("2. Stage 0 (bidirectional, 20% of the text inputs noised) helps alignment; the noise rate, and "
                   "random tokens against one fixed token. Without stage 0, stage 1 takes its steps.", {
                       "noise 0.2 (paper)": recipe(steps),
                       "no stage 0": recipe(steps, stage0=None),
                       "noise 0": recipe(steps, stage0=dict(noise_prob=0.0)),
                       "noise 0.1": recipe(steps, stage0=dict(noise_prob=0.1)),
                       "noise 0.4": recipe(steps, stage0=dict(noise_prob=0.4)),
                       "noise 0.2, one fixed token": recipe(steps, stage0=dict(noise_prob=0.2,
                                                                               noise_token_id=FIXED_NOISE_TOKEN))}),
        "align_first": ("3. Align first (stages 0-1 train the projector side only), then unfreeze, rather than "
                        "training everything from the start, at equal total steps.", {
                            "align first (paper)": recipe(steps),
                            "unfrozen from the start": recipe(steps, unfrozen=True)}),
        "captions": ("4. Consistent machine-style captions converge faster than varied human captions (paper 4.6). "
                     "Same images and questions; each arm's CIDEr-D is against its own style's references.", {
                         "consistent (paper)": recipe(steps),
                         "human": recipe(steps, captions="human")}),
    }
# -----------------------------------------------------------------------------


def pretrain(job):
    """One backbone, trained once for all seeds, as downloaded weights are: "language", a language model trained alone
    on the world's text (both caption styles and the questions; causal, as a text model; the image tokens of frozen
    random towers in front), or "vision", a whole model trained to caption the world, of which only the vision
    encoder is kept. Returns (its checkpoint, CPU seconds); join() puts the two together."""
    run_dir, name, steps, tokenizer_dir, resume = job
    cfg = merged(train.settings, {**SMALL, **{"language": LANGUAGE, "vision": VISION}[name], "seed": 0,
                                  "tokenizer": tokenizer_dir, "max_steps": steps, "out_dir": os.path.join(run_dir, name)},
                 f"experiments.{name.upper()}")
    done = latest_checkpoint(cfg["out_dir"])
    if resume and done and done.endswith(f"step-{steps:07d}"):
        return done, 0.0
    cpu = time.process_time()
    with open(os.path.join(run_dir, f"{name}.log"), "w") as log, redirect_stdout(log), redirect_stderr(log):
        return train.train_stage(cfg), time.process_time() - cpu


def join(language, vision, seed, folder):
    """The paper's starting point (3.1): a language model and a vision encoder that never saw each other, and a new
    projector (drawn from `seed`), whose image tokens are a foreign language to the language model."""
    model = VLM.load(language)
    model.vision.load_state_dict(VLM.load(vision).vision.state_dict())
    torch.manual_seed(seed)
    train.initialise(model.projector)
    model.save(folder, tokenizer=Tokenizer.from_pretrained(language))
    return folder


def train_arm(job):
    """Train one arm's stages for one seed into run_dir (train.py's log in run_dir/train.log), from the seed's
    backbones; score the final checkpoint on heldout images. Returns {"losses": [[loss per step] per stage],
    "captions", "questions"}."""
    run_dir, stages, seed, backbones, n_images = job
    base = merged(train.settings, {**SMALL, "seed": seed, "init_from": backbones}, "experiments.SMALL")
    runs = [merged(base, {**settings, "out_dir": os.path.join(run_dir, name)}, name) for name, settings in stages]
    train.chain_stages(runs, [settings for _, settings in stages])  # each later stage from the one before
    train.check_runs(runs)
    os.makedirs(run_dir, exist_ok=True)
    cpu = time.process_time()
    with open(os.path.join(run_dir, "train.log"), "w") as log, redirect_stdout(log), redirect_stderr(log):
        for cfg in runs:
            train.train_stage(cfg)
    losses = [[json.loads(line)["loss"] for line in open(os.path.join(cfg["out_dir"], "metrics.jsonl"))] for cfg in runs]
    last = runs[-1]
    scores = score(latest_checkpoint(last["out_dir"]), last["shapes_captions"], last["shapes_questions"] > 0, n_images)
    result = {"losses": losses, **scores, "cpu_s": time.process_time() - cpu}
    with open(os.path.join(run_dir, "result.json"), "w") as f:  # for --resume
        json.dump({"stages": stages, "seed": seed, **result}, f)
    return result


def score(checkpoint, captions, questions, n_images):
    """Held-out scores: CIDEr-D of the captions (against the scene's consistent caption, or 5 human ones) and, if
    the arm learnt questions, the share of every relation question about these images answered exactly right."""
    model, tokenizer = VLM.load(checkpoint).eval(), Tokenizer.from_pretrained(checkpoint)
    heldout = shapes.SyntheticShapes(n_images, split="heldout", image_size=model.config.vision.image_size, seed=0,
                                     relations=True)  # the same images for every run
    records = [heldout.record(i) for i in range(n_images)]
    images = [r["image"] for r in records]
    with torch.no_grad():
        said = answer(model, tokenizer, images, [shapes.SHAPES_CAPTION_PROMPT] * n_images)
    truths = [references(r["scene"], captions) for r in records]
    result = {"captions": 100 * shapes.cider_d(said, truths), "questions": None}
    if questions:
        asked = [(image, q, a) for image, r in zip(images, records) for q, a in shapes.relation_questions(r["scene"])]
        with torch.no_grad():
            replies = answer(model, tokenizer, [i for i, _, _ in asked], [q for _, q, _ in asked], max_new_tokens=8)
        result["questions"] = 100 * statistics.mean(reply == truth for (_, _, truth), reply in zip(asked, replies))
    return result


def references(scene, captions):
    if captions == "consistent":
        return [shapes.describe_scene(scene)]
    return [shapes.human_caption(scene, random.Random(f"{shapes.describe_scene(scene)}/{i}")) for i in range(5)]


def blind_questions(n_images, n_scenes=20000):
    """Exact-match of answering each heldout question by the answer it most often has in training, image unseen."""
    seen = {}
    for i in range(n_scenes):
        for question, reply in shapes.relation_questions(shapes.random_scene(random.Random(i), "train", most=3)):
            seen.setdefault(question, {}).setdefault(reply, 0)
            seen[question][reply] += 1
    heldout = shapes.SyntheticShapes(n_images, split="heldout", seed=0, relations=True)
    asked = [qa for i in range(n_images) for qa in shapes.relation_questions(heldout.record(i)["scene"])]
    guess = lambda q: max(seen.get(q, {"": 1}).items(), key=lambda item: item[1])[0]
    return 100 * statistics.mean(guess(q) == a for q, a in asked)


# --- summaries: a table and a picture per experiment ------------------------------------------------------------

def mean_std(values, digits=1):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def end_loss(losses):
    return statistics.mean(losses[-max(1, len(losses) // 10):])  # a stage's last tenth of steps


def stage0_loss(run):
    return end_loss(run["losses"][0]) if len(run["losses"]) == 3 else None  # None: an arm without stage 0


def final_loss(run):
    return end_loss(run["losses"][-1])


def running_mean(values, width=10):
    return [statistics.mean(values[max(0, i - width + 1):i + 1]) for i in range(len(values))]


def steps_to(run, threshold):
    """The first step (counted from the recipe's start) where the last stage's 10-step running loss is below
    `threshold`; None if never."""
    before = sum(len(losses) for losses in run["losses"][:-1])
    return next((before + i + 1 for i, loss in enumerate(running_mean(run["losses"][-1])) if loss < threshold), None)


def caption_style(stages):
    return stages[-1][1]["shapes_captions"]


def table(claim, arms, results, seeds, blind, n_images):
    """Markdown: per arm, mean ± std over the seeds of the held-out scores (and of the captions' difference from the
    paper arm's of the same seed), the loss after alignment (stage 1) and at the end, and steps to a loss level."""
    paper = next(iter(arms))
    threshold = 1.5 * statistics.mean(final_loss(run) for run in results[paper])
    total = sum(len(losses) for losses in results[paper][0]["losses"])
    lines = [claim, "", f"Seeds {', '.join(map(str, seeds))}; mean ± std over them. Held-out: {n_images} images of "
             "scenes never trained on. Δ: CIDEr-D minus the paper arm's of the same seed (the same data order and "
             "projector draw). Losses: a stage's last tenth of steps. Steps: from the start until the last stage's "
             f"10-step running mean is below {threshold:.3f} (1.5 x the paper arm's final loss), of {total}.", "",
             "| arm | captions CIDEr-D | Δ same seed | questions exact % | loss after stage 0 | loss after stage 1 | "
             f"final loss | steps to loss < {threshold:.3f} |", "|" + " --- |" * 8]
    for arm in arms:
        runs = results[arm]
        delta = [run["captions"] - same_seed["captions"] for run, same_seed in zip(runs, results[paper])]
        comparable = arm != paper and caption_style(arms[arm]) == caption_style(arms[paper])  # the same references
        steps = [steps_to(run, threshold) for run in runs]
        never = sum(s is None for s in steps)
        reached = "never" if never == len(steps) else mean_std(steps, 0) + (f" ({never} never)" if never else "")
        lines.append(f"| {arm} | {mean_std([r['captions'] for r in runs])} | {mean_std(delta) if comparable else '-'} "
                     f"| {mean_std([r['questions'] for r in runs])} | {mean_std([stage0_loss(r) for r in runs], 3)} "
                     f"| {mean_std([end_loss(r['losses'][-2]) for r in runs], 3)} "
                     f"| {mean_std([final_loss(r) for r in runs], 3)} | {reached} |")
    if any(run["questions"] is not None for runs in results.values() for run in runs):
        lines += ["", f"Answering each question by its most common training answer, image unseen: {blind:.1f}% exact."]
    return "\n".join(lines) + "\n"


COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def plot(path, title, arms, results):
    """The loss per step (10-step running mean, log scale) of every arm: its mean over the seeds as a line, their
    min-max as a band; dotted lines where the paper arm's stages change."""
    width, height, left, right, top, bottom = 900, 520, 60, 20, 40, 130
    curves = {arm: [running_mean([x for losses in run["losses"] for x in losses]) for run in results[arm]] for arm in arms}
    steps = max(len(c) for runs in curves.values() for c in runs)
    values = [v for runs in curves.values() for c in runs for v in c]
    low, high = math.log10(max(min(values), 1e-3)), math.log10(max(values))
    x = lambda i: left + i * (width - left - right) / max(1, steps - 1)
    y = lambda v: top + (high - math.log10(max(v, 1e-3))) / max(high - low, 1e-9) * (height - top - bottom)
    canvas = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(canvas)
    for tick in [t * 10 ** e for e in range(-3, 2) for t in (1, 1.5, 2, 3, 4, 5, 7)]:
        if low <= math.log10(tick) <= high:
            pen.line((left - 4, y(tick), width - right, y(tick)), fill=(230, 230, 230))
            pen.text((left - 34, y(tick) - 6), f"{tick:g}", fill="black")
    for step in range(0, steps + 1, 100 if steps > 300 else 10):
        pen.line((x(step), height - bottom, x(step), height - bottom + 4), fill="gray")
        pen.text((x(step) - 8, height - bottom + 6), str(step), fill="black")
    bands = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    for colour, arm in zip(COLOURS, arms):
        runs, n = curves[arm], min(len(c) for c in curves[arm])
        lows = [min(c[i] for c in runs) for i in range(n)]
        highs = [max(c[i] for c in runs) for i in range(n)]
        ImageDraw.Draw(bands).polygon([(x(i), y(v)) for i, v in enumerate(highs)] +
                                      [(x(i), y(v)) for i, v in reversed(list(enumerate(lows)))], fill=(*colour, 60))
    canvas.paste(bands, (0, 0), bands)
    pen.rectangle((left, top, width - right, height - bottom), outline="gray")
    boundary = 0
    for name, losses in zip(("stage 0", "stage 1", "stage 2"), results[arms[0]][0]["losses"]):  # the paper arm's
        pen.text((x(boundary) + 4, top + 4), name, fill="gray")
        boundary += len(losses)
        if boundary < steps:
            for dash in range(top, height - bottom, 8):
                pen.line((x(boundary), dash, x(boundary), dash + 3), fill="gray")
    for colour, arm in zip(COLOURS, arms):
        runs, n = curves[arm], min(len(c) for c in curves[arm])
        pen.line([(x(i), y(statistics.mean(c[i] for c in runs))) for i in range(n)], fill=colour, width=2)
    pen.text((left, 12), title, fill="black")
    pen.text((width - right - 40, height - bottom + 18), "step", fill="black")
    for row, (colour, arm) in enumerate(zip(COLOURS, arms)):
        y0 = height - bottom + 30 + 16 * row
        pen.rectangle((left, y0, left + 24, y0 + 10), fill=colour)
        pen.text((left + 32, y0 - 1), arm, fill="black")
    canvas.save(path)


def distinct_recipes(chosen):
    """{recipe as JSON: its run name}: an arm in several experiments (the paper's recipe) trains once per seed,
    named after its first appearance."""
    recipes = {}
    for name, (_, arms) in chosen.items():
        for arm, stages in arms.items():
            slug = "".join(c if c.isalnum() else "-" for c in arm.split(" (")[0])
            recipes.setdefault(json.dumps(stages), f"{name}-{slug}")
    return recipes


def finished(work):
    """{(recipe as JSON, seed): result} of the trainings an interrupted run completed (their result.json)."""
    results = {}
    for run_dir, stages, seed, *_ in work:
        saved = os.path.join(run_dir, "result.json")
        if os.path.exists(saved):
            with open(saved) as f:
                result = json.load(f)
            if result.pop("stages") == stages and result.pop("seed") == seed:
                results[json.dumps(stages), seed] = result
    return results


def write_report(folder, name, claim, arms, by_arm, seeds, blind, n_images):
    """An experiment's results.md (the table), results.json (every run's numbers) and loss.png; returns the table."""
    os.makedirs(folder, exist_ok=True)
    text = table(claim, arms, by_arm, seeds, blind, n_images)
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(f"# {name}\n\n{text}\n![loss curves](loss.png)\n")
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"claim": claim, "seeds": seeds, "arms": {arm: {"stages": arms[arm], "runs": by_arm[arm]}
                                                             for arm in arms}}, f)
    plot(os.path.join(folder, "loss.png"), f"{name}: training loss, mean and min-max band over {len(seeds)} "
         f"seeds (10-step running mean, log scale; dashed: the paper arm's stages)", list(arms), by_arm)
    return text


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="experiments to run (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm: 1337, 1338, ...")
    parser.add_argument("--quick", action="store_true", help="a few steps and images: checks the runner only")
    parser.add_argument("--jobs", type=int, default=2, help="trainings side by side, a thread each")
    parser.add_argument("--out", default="out/experiments")
    parser.add_argument("--resume", action="store_true", help="keep the trainings an interrupted run finished")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        parser.error(f"--seeds={args.seeds} and --jobs={args.jobs}: each must be at least 1")
    unknown = set(args.names) - set(experiments(STEPS))
    if unknown:
        parser.error(f"unknown experiment(s) {sorted(unknown)}; choose from {list(experiments(STEPS))}")
    return args


def main(argv=None):
    args = parse_args(argv)
    steps, n_images = (QUICK_STEPS, QUICK_EVAL_IMAGES) if args.quick else (STEPS, EVAL_IMAGES)
    every = experiments(steps)
    chosen = {name: every[name] for name in args.names or every}
    seeds, started = [1337 + i for i in range(args.seeds)], time.time()
    tokenizer_dir = os.path.join(args.out, "tokenizer")  # one vocabulary for every caption style and question
    shapes.shapes_tokenizer(512, every_world=True).save(tokenizer_dir)
    recipes = distinct_recipes(chosen)
    print(f"{len(recipes) * len(seeds)} trainings: {len(recipes)} recipes x {len(seeds)} seeds, {args.jobs} at a "
          f"time, after the backbones of each seed", flush=True)
    # small matrices: a thread per training, and trainings side by side, use the cores best
    pool = multiprocessing.get_context("spawn").Pool(args.jobs, torch.set_num_threads, (1,)) if args.jobs > 1 else None
    pretrained = os.path.join(args.out, "runs", "backbones")
    os.makedirs(pretrained, exist_ok=True)
    (language, language_cpu), (vision, vision_cpu) = (pool.map if pool else map)(
        pretrain, [(pretrained, name, steps[name], tokenizer_dir, args.resume) for name in ("language", "vision")])
    backbones = {seed: join(language, vision, seed, os.path.join(pretrained, f"seed{seed}")) for seed in seeds}
    print(f"  {time.time() - started:5.0f}s  backbones: {language} + {vision}", flush=True)
    work = [(os.path.join(args.out, "runs", run_name, f"seed{seed}"), json.loads(key), seed, backbones[seed], n_images)
            for key, run_name in recipes.items() for seed in seeds]
    results = finished(work) if args.resume else {}
    todo = [job for job in work if (json.dumps(job[1]), job[2]) not in results]
    for (run_dir, stages, seed, *_), result in zip(todo, (pool.imap if pool else map)(train_arm, todo)):
        results[json.dumps(stages), seed] = result
        questions = "-" if result["questions"] is None else f"{result['questions']:.1f}%"
        print(f"  {time.time() - started:5.0f}s  {run_dir}: captions CIDEr-D {result['captions']:.1f}, "
              f"questions {questions}", flush=True)
    if pool:
        pool.close()
    blind = blind_questions(n_images)
    for name, (claim, arms) in chosen.items():
        by_arm = {arm: [results[json.dumps(stages), seed] for seed in seeds] for arm, stages in arms.items()}
        text = write_report(os.path.join(args.out, name), name, claim, arms, by_arm, seeds, blind, n_images)
        print(f"\n## {name}\n\n{text}", flush=True)
    cpu = language_cpu + vision_cpu + sum(result["cpu_s"] for result in results.values())
    print(f"all done in {(time.time() - started) / 60:.1f} minutes ({len(todo)} trainings now); {cpu / 60:.1f} CPU "
          f"minutes of training in all; tables and pictures in {args.out}/<experiment>/")

if __name__ == "__main__":
    main()

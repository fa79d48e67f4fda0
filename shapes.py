"""The offline demo's world: circles, squares and triangles in the corners of a small image, drawn on the fly, with
captions and answers that follow from what is drawn, so only a model that looks gets them right. The "heldout" split
holds the fifth of two-shape captions that "train" and "val" never show, each made of parts seen (shape and place)."""
import random
import zlib

from PIL import Image, ImageDraw

from data import IndexedSource, Tokenizer, chat_prompt, conversation_messages, train_tokenizer
from model import VLM
from sample import answer  # the same captioning path as sample.py and eval.py

SHAPE_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPE_KINDS = ["circle", "square", "triangle"]
SHAPE_POSITIONS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25),
                   "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75)}  # in reading order
SHAPE_PAIRS = [(colour, kind) for colour in SHAPE_COLOURS for kind in SHAPE_KINDS]
SHAPES_SPLITS = ["train", "val", "heldout"]
SHAPES_CAPTION_PROMPT = "Describe the image."


def is_heldout(scene):
    """A fixed fifth of the two-shape scenes, chosen by a hash of their caption."""
    return len(scene) == 2 and zlib.crc32(describe_scene(scene).encode()) % 5 == 0


def random_scene(rng, split):
    """1-2 different shapes [(colour, kind, position)] in distinct corners, in reading order, of the split."""
    while True:
        count = 2 if split == "heldout" else rng.choice([1, 2])
        positions = sorted(rng.sample(list(SHAPE_POSITIONS), count), key=list(SHAPE_POSITIONS).index)
        scene = [(colour, kind, position) for (colour, kind), position in zip(rng.sample(SHAPE_PAIRS, count), positions)]
        if is_heldout(scene) == (split == "heldout"):
            return scene


def draw_scene(scene, image_size, rng):
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for colour, kind, position in scene:
        # A little jitter in place and size; small enough that a shape stays inside its corner.
        x, y = ((centre + rng.uniform(-0.04, 0.04)) * image_size for centre in SHAPE_POSITIONS[position])
        r = rng.uniform(0.13, 0.19) * image_size
        box, fill = [x - r, y - r, x + r, y + r], SHAPE_COLOURS[colour]
        if kind == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
        else:
            (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=fill)
    return image


def describe_scene(scene):
    """'a red circle in the top left and a blue square in the bottom right.'"""
    return " and ".join(f"a {colour} {kind} in the {position}" for colour, kind, position in scene) + "."


def scene_questions(scene):
    """Every question the scene answers unambiguously: [(question, answer)]."""
    kinds = [kind for _, kind, _ in scene]
    questions = [("How many shapes are there?", ["one.", "two."][len(scene) - 1])]
    for colour, kind, position in scene:
        questions.append((f"What is in the {position}?", f"a {colour} {kind}."))
        questions.append((f"Where is the {colour} {kind}?", f"in the {position}."))
        if kinds.count(kind) == 1:
            questions.append((f"What colour is the {kind}?", f"{colour}."))
    return questions


class SyntheticShapes(IndexedSource):
    """`n_samples` shape images, each with a caption turn and then `questions` question turns. Sample i is
    generated from (split, seed, i) when asked for, so it is always the same and nothing is stored."""

    def __init__(self, n_samples, split="train", image_size=64, seed=0, questions=0):
        if split not in SHAPES_SPLITS:
            raise ValueError(f"split must be one of {SHAPES_SPLITS}, got {split!r}")
        self.n_samples, self.split, self.image_size, self.seed, self.questions = n_samples, split, image_size, seed, questions

    def __len__(self):
        return self.n_samples

    def record(self, index):
        """{"name", "image": PIL image, "conversations", "scene": [(colour, kind, position)]} of sample `index`."""
        rng = random.Random(f"shapes/{self.split}/{self.seed}/{index}")  # a str seed is hashed deterministically
        scene = random_scene(rng, self.split)
        questions = scene_questions(scene)
        turns = [(SHAPES_CAPTION_PROMPT, describe_scene(scene))] + rng.sample(questions, min(self.questions, len(questions)))
        if self.questions:
            rng.shuffle(turns)  # any turn may come first, so a question can also be asked alone
        conversation = [{"from": who, "value": text} for turn in turns for who, text in zip(("human", "gpt"), turn)]
        return {"name": f"shapes {self.split} seed {self.seed} sample {index}", "scene": scene,
                "image": draw_scene(scene, self.image_size, rng), "conversations": conversation}


def shapes_tokenizer(vocab_size=400):
    """The demo's tokenizer: a tiny BPE trained on synthetic-shape conversations in the chat format."""
    shapes = SyntheticShapes(300, questions=4)
    conversations = [conversation_messages(shapes.record(i)["conversations"]) for i in range(len(shapes))]
    return train_tokenizer([chat_prompt(messages) for messages in conversations], vocab_size)


def evaluate_demo(checkpoint, cfg, n_images=100):
    """Caption and score images the model never saw: "val" scenes, drawn like the training ones, and "heldout"
    ones, which only a model that composes what it sees gets right; after stage 3, also ask questions about the
    heldout images. train.py runs it on rank 0 alone, so it prints."""
    model, tokenizer = VLM.load(checkpoint).eval(), Tokenizer.from_pretrained(checkpoint)
    for split in ("val", "heldout"):
        shapes = SyntheticShapes(n_images, split=split, image_size=model.config.vision.image_size, seed=cfg["seed"])
        records = [shapes.record(i) for i in range(n_images)]
        captions = answer(model, tokenizer, [r["image"] for r in records], [SHAPES_CAPTION_PROMPT] * n_images)
        truths = [describe_scene(r["scene"]) for r in records]
        for caption, truth in list(zip(captions, truths))[:4]:
            print(f"  {'right' if caption == truth else 'WRONG'}  {caption!r:70} truth: {truth!r}", flush=True)
        exact = sum(c == t for c, t in zip(captions, truths)) / n_images
        print(f"{split} captions: CIDEr-D {100 * cider_d(captions, truths):.1f}, exactly right {100 * exact:.0f}% "
              f"of {n_images} images", flush=True)
    if cfg["shapes_questions"]:  # stage 3 taught questions (a VQA flavour, like PathVQA): ask them of `records`, heldout's
        asked = [(r["image"], q, a) for r in records for q, a in scene_questions(r["scene"])]
        replies = answer(model, tokenizer, [image for image, _, _ in asked], [q for _, q, _ in asked])
        for (_, question, truth), reply in list(zip(asked, replies))[:4]:
            print(f"  {'right' if reply == truth else 'WRONG'}  {question!r:32} -> {reply!r:24} truth: {truth!r}", flush=True)
        right = sum(reply == truth for (_, _, truth), reply in zip(asked, replies)) / len(asked)
        print(f"heldout questions: {100 * right:.0f}% of {len(asked)} answered exactly right", flush=True)


def cider_d(captions, truths):
    """pycocoevalcap's CIDEr-D. These captions are lower-case words and a full stop, so splitting on spaces
    tokenizes them as the PTB tokenizer would, and the demo needs no Java."""
    from pycocoevalcap.cider.cider import Cider
    words = lambda texts: {i: [" ".join(text.lower().replace(".", " ").split())] for i, text in enumerate(texts)}
    return Cider().compute_score(words(truths), words(captions))[0]

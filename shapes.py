"""The offline demo's world: circles, squares and triangles in the corners of a small image, drawn on the fly, with
captions and answers that follow from what is drawn, so only a model that looks gets them right. The "heldout" split
holds the fifth of two-shape captions that "train" and "val" never show, each made of parts seen (shape and place).

experiments.py also uses two variants (train.py's shapes_relations and shapes_captions): scenes of 1-3 shapes with
questions that need the whole image at once (counts, "left of", "same colour", one shape's place from another's), and
"human" captions beside the consistent ones: many wordings per scene, synonyms, details left out, any order."""
import itertools
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
SHAPES_CAPTION_STYLES = ["consistent", "human", "mixed"]  # mixed: either, at random
HUMAN_KIND_WORDS = {"circle": ["circle", "ball", "dot", "disc"], "square": ["square", "box", "block"],
                    "triangle": ["triangle", "wedge"]}
HUMAN_PLACE_WORDS = {"top left": ["top left", "upper left", "top left corner"],
                     "top right": ["top right", "upper right", "top right corner"],
                     "bottom left": ["bottom left", "lower left", "bottom left corner"],
                     "bottom right": ["bottom right", "lower right", "bottom right corner"]}
NUMBER_WORDS = ["none", "one", "two", "three"]


def is_heldout(scene):
    """A fixed fifth of the scenes of two or more shapes, chosen by a hash of their caption."""
    return len(scene) >= 2 and zlib.crc32(describe_scene(scene).encode()) % 5 == 0


def random_scene(rng, split, most=2):
    """1 to `most` (2 or 3) different shapes [(colour, kind, position)] in distinct corners, in reading order."""
    while True:
        if most == 2:  # the demo's draws, kept as they were
            count = 2 if split == "heldout" else rng.choice([1, 2])
        else:
            count = rng.choice(range(2 if split == "heldout" else 1, most + 1))
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


def relation_questions(scene):
    """Questions only the whole image answers: how many (of a colour, of a kind), and for every two shapes whether
    one is left of the other, where one is from the other, and whether they share a colour: [(question, answer)]."""
    count = lambda n: f"{NUMBER_WORDS[n]}."
    questions = [("How many shapes are there?", count(len(scene)))]
    questions += [(f"How many {colour} shapes are there?", count(sum(c == colour for c, _, _ in scene)))
                  for colour in SHAPE_COLOURS]
    questions += [(f"How many {kind}s are there?", count(sum(k == kind for _, k, _ in scene))) for kind in SHAPE_KINDS]
    for (colour, kind, position), (other_colour, other_kind, other_position) in itertools.permutations(scene, 2):
        (x, y), (other_x, other_y) = SHAPE_POSITIONS[position], SHAPE_POSITIONS[other_position]
        a, b = f"the {colour} {kind}", f"the {other_colour} {other_kind}"
        questions.append((f"Is {a} left of {b}?", "yes." if x < other_x else "no."))
        directions = ["above" if y < other_y else "below" if y > other_y else "",
                      "to the left" if x < other_x else "to the right" if x > other_x else ""]
        questions.append((f"Where is {a} from {b}?", " and ".join(filter(None, directions)) + "."))
    kinds = [kind for _, kind, _ in scene]
    for (colour, kind, _), (other_colour, other_kind, _) in itertools.combinations(scene, 2):
        if kinds.count(kind) == kinds.count(other_kind) == 1:  # "the circle" names one shape
            questions.append((f"Are the {kind} and the {other_kind} the same colour?",
                              "yes." if colour == other_colour else "no."))
    return questions


def human_caption(scene, rng):
    """A caption as people write them: the shapes in any order, synonyms, sometimes no place or colour, or a shape
    left out; several wordings per scene. Only what it says is true."""
    shapes = rng.sample(scene, len(scene))
    if len(shapes) > 1 and rng.random() < 0.25:
        shapes = shapes[:-1]
    parts = []
    for colour, kind, position in shapes:
        kind, place = rng.choice(HUMAN_KIND_WORDS[kind]), rng.choice(HUMAN_PLACE_WORDS[position])
        parts.append(rng.choice([f"a {colour} {kind} in the {place}", f"a {colour} {kind} at the {place}",
                                 f"a {colour} {kind} {place}", f"in the {place} a {colour} {kind}",
                                 f"a {colour} {kind}", f"a {kind} in the {place}", f"some {colour} {kind}"]))
    opening = rng.choice(["", "", "", "there is ", "i see ", "a picture of ", "looks like "])
    return opening + rng.choice([" and ", " and ", " with ", " plus "]).join(parts) + "."


class SyntheticShapes(IndexedSource):
    """`n_samples` shape images, each with a caption turn and then `questions` question turns. Sample i is
    generated from (split, seed, i) when asked for, so it is always the same and nothing is stored. `relations`:
    scenes of 1-3 shapes and relation_questions; `captions="human"`: human_caption, on the same images; "mixed": either."""

    def __init__(self, n_samples, split="train", image_size=64, seed=0, questions=0, captions="consistent",
                 relations=False):
        if split not in SHAPES_SPLITS:
            raise ValueError(f"split must be one of {SHAPES_SPLITS}, got {split!r}")
        if captions not in SHAPES_CAPTION_STYLES:
            raise ValueError(f"captions must be one of {SHAPES_CAPTION_STYLES}, got {captions!r}")
        self.n_samples, self.split, self.image_size, self.seed, self.questions = n_samples, split, image_size, seed, questions
        self.captions, self.relations = captions, relations

    def __len__(self):
        return self.n_samples

    def record(self, index):
        """{"name", "image": PIL image, "conversations", "scene": [(colour, kind, position)]} of sample `index`."""
        name = f"shapes/{self.split}/{self.seed}/{index}"
        rng = random.Random(name)  # a str seed is hashed deterministically
        scene = random_scene(rng, self.split, most=3 if self.relations else 2)
        questions = relation_questions(scene) if self.relations else scene_questions(scene)
        caption_rng = random.Random(name + "/human")  # apart from `rng`: the same images in every style
        style = caption_rng.choice(["consistent", "human"]) if self.captions == "mixed" else self.captions
        caption = describe_scene(scene) if style == "consistent" else human_caption(scene, caption_rng)
        turns = [(SHAPES_CAPTION_PROMPT, caption)] + rng.sample(questions, min(self.questions, len(questions)))
        if self.questions:
            rng.shuffle(turns)  # any turn may come first, so a question can also be asked alone
        conversation = [{"from": who, "value": text} for turn in turns for who, text in zip(("human", "gpt"), turn)]
        return {"name": f"shapes {self.split} seed {self.seed} sample {index}", "scene": scene,
                "image": draw_scene(scene, self.image_size, rng), "conversations": conversation}


def shapes_tokenizer(vocab_size=400, every_world=False):
    """The demo's tokenizer: a tiny BPE trained on synthetic-shape conversations in the chat format; `every_world`:
    also on the relation questions and human captions (experiments.py's, vocab_size 512)."""
    worlds = [SyntheticShapes(300, questions=4)]
    if every_world:
        worlds += [SyntheticShapes(300, questions=4, relations=True), SyntheticShapes(300, captions="human")]
    conversations = [conversation_messages(shapes.record(i)["conversations"]) for shapes in worlds for i in range(300)]
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
    """pycocoevalcap's CIDEr-D; a truth is a caption or a list of them (several references). These captions are
    lower-case words and a full stop, so splitting on spaces tokenizes them as the PTB tokenizer would: no Java."""
    from pycocoevalcap.cider.cider import Cider
    words = lambda text: " ".join(text.lower().replace(".", " ").split())
    references = {i: [words(t) for t in ([truth] if isinstance(truth, str) else truth)] for i, truth in enumerate(truths)}
    return Cider().compute_score(references, {i: [words(caption)] for i, caption in enumerate(captions)})[0]

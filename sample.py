"""Caption an image, or ask a question about it, with a trained checkpoint or the pretrained backbones.

    python sample.py --checkpoint out/stage3 --image cat.jpg --prompt "What is in the image?"
    python sample.py --checkpoint out/stage3 --image a.jpg --image b.jpg,c.jpg --num_beams 3
    python sample.py --image cat.jpg    # no --checkpoint: SigLIP + Qwen2.5 joined by an untrained projector

Each image is answered on its own; one image under greedy decoding streams its answer. eval.py uses `answer()`."""
import argparse

import torch

from checkpoints import checkpoint_folder
from data import SHORT_CAPTION_PROMPT, Tokenizer, chat_ids, load_image, preprocess_image, turn_text
from model import VLM


def at_least(minimum):
    """An argparse type: an integer no smaller than `minimum`."""
    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def add_model_args(parser):
    """The arguments that choose the model (default backbones: the paper's, as train.py's); shared with eval.py."""
    parser.add_argument("--checkpoint", type=checkpoint_folder, help="our checkpoint, or a training run's out_dir (its "
                        "newest); without it the --vision and --language backbones, joined by an untrained projector")
    parser.add_argument("--vision", default="google/siglip-so400m-patch14-224", help="SigLIP folder or Hub id")
    parser.add_argument("--language", default="Qwen/Qwen2.5-0.5B", help="Qwen2 folder or Hub id")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id; default: the checkpoint's, else --language's")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--max_new_tokens", type=at_least(1), default=30)
    parser.add_argument("--num_beams", type=at_least(1), default=1, help="1 = greedy decoding, more = beam search")
    parser.add_argument("--mask_kind", choices=["prefix", "prefix_prompt", "causal"],
                        help="the mask to decode under; default: the "
                        "one the checkpoint was trained under (prefix without one, and after stage 0's bidirectional)")


def load_model(args, device=None):
    """(model in eval mode on the device, tokenizer) as the model arguments ask."""
    device = device or args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if str(device).startswith("cuda") else "float32"))
    model = (VLM.load(args.checkpoint, dtype=dtype) if args.checkpoint
             else VLM.from_pretrained(vision=args.vision, language=args.language, dtype=dtype))
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or args.checkpoint or args.language)
    model.config.mask_kind = args.mask_kind or model.config.mask_kind
    return model.to(device).eval(), tokenizer


def prompt_ids(tokenizer, prompt):
    """The question as a chat turn, cleaned as in training (data.turn_text), ending where the answer starts."""
    return chat_ids(tokenizer, [{"role": "user", "content": turn_text(prompt)}])


def left_pad(sequences, pad_id):
    """Token lists -> input_ids [B, T] padded on the left (every answer starts at T), and text_mask (False on pads)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences])
    text_mask = torch.tensor([[False] * (width - len(s)) + [True] * len(s) for s in sequences])
    return input_ids, text_mask


class TokenPrinter:
    """An on_token callback printing one answer as it grows, all its tokens decoded (a character may span several)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def __call__(self, tokens, hold_incomplete=True):
        if tokens is not None and tokens[0] >= 0:  # -1 once the sequence has ended
            self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids).lstrip()  # as answer() strips it
        if hold_incomplete and text.endswith("\ufffd"):  # maybe the first bytes of a character: wait for the rest
            return
        print(text[self.printed:], end="", flush=True)
        self.printed = len(text)

    def finish(self):
        self(None, hold_incomplete=False)
        print()


def answer(model, tokenizer, images, prompts, max_new_tokens=30, num_beams=1, on_token=None):
    """PIL images and one prompt per image -> the model's answers (strings)."""
    weight = next(model.parameters())  # the model's device and dtype
    pixel_values = torch.stack([preprocess_image(image, model.config.vision.image_size) for image in images])
    input_ids, text_mask = left_pad([prompt_ids(tokenizer, p) for p in prompts], tokenizer.pad_id)
    new_tokens = model.generate(pixel_values.to(weight.device, weight.dtype), input_ids.to(weight.device),
                                text_mask.to(weight.device), max_new_tokens=max_new_tokens, num_beams=num_beams,
                                eos_ids=(tokenizer.im_end_id, tokenizer.eos_id), on_token=on_token)
    return [tokenizer.decode(tokens).strip() for tokens in new_tokens]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", action="append", required=True,
                        help="image file; repeat the flag or give a comma-separated list for several")
    parser.add_argument("--prompt", default=SHORT_CAPTION_PROMPT,
                        help=f"default: {SHORT_CAPTION_PROMPT!r}, which config/caption_coco.py trains on")
    add_model_args(parser)
    args = parser.parse_args(argv)
    args.image = [path for value in args.image for path in value.split(",") if path]
    return args


def main(argv=None):
    args = parse_args(argv)
    images = [load_image(path, path) for path in args.image]  # a wrong path fails before the model loads
    model, tokenizer = load_model(args)
    streams = len(images) == 1 and args.num_beams == 1  # generate's on_token streams greedy decoding only
    printer = TokenPrinter(tokenizer) if streams else None
    answers = answer(model, tokenizer, images, [args.prompt] * len(images), args.max_new_tokens, args.num_beams,
                     on_token=printer)
    if streams:
        printer.finish()
    else:
        for path, text in zip(args.image, answers):
            print(f"{path}: {text}")
    return answers


if __name__ == "__main__":
    main()

"""Our checkpoint as an lmms-eval model (lmms-eval 0.7.3's `lmms` interface), for the standard benchmarks.

    pip install --no-deps lmms-eval==0.7.3 && pip install -r requirements-lmms.txt   # registers "vlm_align"
    lmms-eval --model vlm_align --model_args checkpoint=out/stage3 --tasks mmstar,ocrbench --output_path eval/lmms

Each request is one image and a question, laid out as in training: [image tokens | ChatML prompt] under the
checkpoint's mask (sample.answer). Generation is greedy (or beam search with num_beams); log-likelihood is the sum
of the continuation's token log-probabilities after the prompt's answer header. lmms_plugin/ registers the class
under lmms-eval's `lmms_eval.models` entry points; lmms-eval is an optional extra, imported only here.
"""
import argparse

import torch
import torch.nn.functional as F
from lmms_eval.api.model import lmms

from data import preprocess_image
from model import prompt_rows
from sample import add_model_args, answer, load_model, prompt_ids


def model_args(checkpoint, device, dtype, mask_kind):
    """sample.py's model arguments (a run's out_dir stands for its newest checkpoint, as there)."""
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    argv = [f"--checkpoint={checkpoint}"] + [f"--{name}={value}" for name, value in
                                             (("device", device), ("dtype", dtype), ("mask_kind", mask_kind)) if value]
    return parser.parse_args(argv)


class VLMAlign(lmms):
    """lmms-eval's model interface over model.VLM: generate_until and loglikelihood, one image per request."""

    is_simple = True  # lmms-eval hands "simple" models (context, settings, doc_to_visual, doc_id, task, split)

    def __init__(self, checkpoint="out/stage3", device=None, dtype=None, mask_kind=None, batch_size=1, **unused):
        super().__init__()
        if unused:
            raise ValueError(f"vlm_align: unknown model_args {sorted(unused)}; it takes checkpoint, device, dtype, "
                             "mask_kind, batch_size")
        args = model_args(checkpoint, device, dtype, mask_kind)
        self.model, self.tokenizer = load_model(args)
        self.batch_size = int(batch_size)

    def image_of(self, request):
        """The request's one image: the model reads exactly one (paper 3.1)."""
        _, _, doc_to_visual, doc_id, task, split = request.args
        images = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        if len(images) != 1:
            raise ValueError(f"vlm_align reads one image per question; {task} {split} doc {doc_id} has {len(images)}")
        return images[0]

    def generate_until(self, requests):
        """Each request's answer, cut at the first of its `until` strings."""
        answers = []
        for batch in batches(requests, self.batch_size):
            settings = generation_settings(batch[0].args[1])
            texts = answer(self.model, self.tokenizer, [self.image_of(r) for r in batch], [r.args[0] for r in batch],
                           settings["max_new_tokens"], settings["num_beams"])
            answers += [cut_at(text, settings["until"]) for text in texts]
        return answers

    def loglikelihood(self, requests):
        """(sum of the continuation's token log-probabilities, whether greedy decoding gives it) per request."""
        results = []
        for request in requests:
            context, target, _, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            results.append(self.continuation_logprob(self.image_of(request), context, continuation))
        return results

    @torch.no_grad()
    def continuation_logprob(self, image, context, continuation):
        """log p(continuation | image, context) as the answer to the prompt, and whether each token is the argmax."""
        model, weight = self.model, next(self.model.parameters())
        prompt, target = prompt_ids(self.tokenizer, context), self.tokenizer.encode_text(continuation)
        input_ids = torch.tensor([prompt + target], device=weight.device)
        rows, document = prompt_rows(input_ids, torch.ones_like(input_ids, dtype=torch.bool), model.n_image_tokens)
        pixel_values = preprocess_image(image, model.config.vision.image_size)[None].to(weight.device, weight.dtype)
        answer = torch.zeros_like(rows, dtype=torch.bool)
        answer[0, -len(target):] = True  # under prefix_prompt the prompt is seen both ways, the answer stays causal
        hidden = model.hidden_states(model.image_tokens(pixel_values), rows, document, model.config.mask_kind,
                                     labelled=answer)
        logits = model.language.lm_head(hidden[0, -len(target) - 1:-1]).float()  # position t predicts token t + 1
        targets = torch.tensor(target, device=weight.device)
        logprob = F.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum()
        return logprob.item(), bool((logits.argmax(-1) == targets).all())

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vlm_align answers single-round questions only (generate_until)")


def batches(requests, size):
    """Consecutive requests of the same generation settings, at most `size` at a time, in order."""
    batch = []
    for request in requests:
        if batch and (len(batch) == size or request.args[1] != batch[0].args[1]):
            yield batch
            batch = []
        batch.append(request)
    if batch:
        yield batch


def generation_settings(gen_kwargs):
    """lmms-eval's generation kwargs -> ours: greedy or beam search (sampling is refused), the stop strings."""
    if gen_kwargs.get("do_sample"):
        raise ValueError("vlm_align decodes greedily or by beam search; the task asks for sampling (do_sample)")
    until = gen_kwargs.get("until") or []
    return {"max_new_tokens": int(gen_kwargs.get("max_new_tokens", 30)), "num_beams": int(gen_kwargs.get("num_beams", 1)),
            "until": [until] if isinstance(until, str) else list(until)}


def cut_at(text, stops):
    """The text before the first stop string it contains."""
    return min((text[:text.index(stop)] for stop in stops if stop and stop in text), key=len, default=text)

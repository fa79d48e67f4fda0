# Fine-tuning on PathVQA (paper 4.5): pathology images, yes/no and open questions; starts from stage 3.
dataset = "flaviagiammarino/path-vqa"
data_format = "pathvqa"
mask_kind = "prefix"
noise_prob = 0.0
vision_lr, projector_lr, language_lr = 5e-6, 1e-4, 2e-5
max_text_tokens = 128
init_from = "out/stage3"
out_dir = "out/pathvqa"
# short questions and answers of similar length (~45 text tokens after the 256 image tokens): padding each
# micro-batch to its longest, in steps of 16 tokens (at most 8 shapes to compile), wastes less than packing
# ~300-token documents into rows, which leaves ~10% of every row empty
pack_length = 0
pad_to_multiple = 16

# Fine-tuning on PathVQA (paper 4.4): pathology images, yes/no and open questions; starts from stage 3.
stage = 3
dataset = "flaviagiammarino/path-vqa"
data_format = "pathvqa"
mask_kind = "prefix"
noise_prob = 0.0
vision_lr, projector_lr, language_lr = 5e-6, 1e-4, 2e-5
max_text_tokens = 128
init_from = "out/stage3"
out_dir = "out/pathvqa"
pack_length = 1024  # short questions and answers: several share a row

# Stage 0 (paper 3.4, Algorithm 1): align the projector with a fully bidirectional mask. The next token is
# visible under that mask, so 20% of the text inputs are replaced by noise. Vision and language stay frozen.
dataset = "lmms-lab/LLaVA-ReCap-118K"
data_format = "parquet"
mask_kind = "bidirectional"
noise_prob = 0.2
vision_lr, projector_lr, language_lr = 0.0, 1e-3, 0.0
init_from = ""  # the pretrained SigLIP and Qwen2.5 with a fresh projector
out_dir = "out/stage0"

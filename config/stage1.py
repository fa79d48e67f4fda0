# Stage 1 (paper 3.4, Algorithm 2, Fig. 3b): the prefix mask (image block bidirectional, text causal);
# still only the projector trains, on the same COCO re-captions.
dataset = "lmms-lab/LLaVA-ReCap-118K"
data_format = "parquet"
mask_kind = "prefix"
noise_prob = 0.0
vision_lr, projector_lr, language_lr = 0.0, 1e-3, 0.0
init_from = "out/stage0"
out_dir = "out/stage1"

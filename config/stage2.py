# Stage 2 (paper 3.4, Table 5): everything trains, under the prefix mask, on the 558K BLIP re-captions.
dataset = "lmms-lab/LLaVA-ReCap-558K"
data_format = "parquet"
mask_kind = "prefix"
noise_prob = 0.0
vision_lr, projector_lr, language_lr = 5e-6, 2e-3, 2e-5
init_from = "out/stage1"
out_dir = "out/stage2"

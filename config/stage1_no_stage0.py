# Claim 2 (FINDINGS.md), an arm: no stage 0. Stage 1 from the pretrained backbones, for two epochs: the steps of the
# paper's stages 0 and 1 together. Compare its loss and, after stage 2 from it, its scores with the paper's recipe.
dataset = "lmms-lab/LLaVA-ReCap-118K"
data_format = "parquet"
mask_kind = "prefix"
noise_prob = 0.0
vision_lr, projector_lr, language_lr = 0.0, 1e-3, 0.0
epochs = 2
init_from = ""  # SigLIP and Qwen2.5 with a fresh projector
out_dir = "out/stage1_no_stage0"

# Claim 1 (FINDINGS.md), an arm: stage 1 under LLaVA's plain causal mask, where an image token sees only the
# image tokens before it. Compare with config/stage1.py (the paper's prefix mask), both from out/stage0; then
# config/stage2_causal.py.
dataset = "lmms-lab/LLaVA-ReCap-118K"
data_format = "parquet"
mask_kind = "causal"
noise_prob = 0.0
vision_lr, projector_lr, language_lr = 0.0, 1e-3, 0.0
init_from = "out/stage0"
out_dir = "out/stage1_causal"

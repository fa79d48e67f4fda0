# Claim 2 (FINDINGS.md), an arm: stage 0 with 10% of the text inputs noised (the paper: 20%). Then stage 1 from it:
#   python train.py config/stage1.py --init_from=out/stage0_noise10 --out_dir=out/stage1_noise10
# and compare its loss with the paper's (out/stage1) and config/stage1_no_stage0.py's; then stage 2 likewise.
dataset = "lmms-lab/LLaVA-ReCap-118K"
data_format = "parquet"
mask_kind = "bidirectional"
noise_prob = 0.1
noise_token_id = -1
vision_lr, projector_lr, language_lr = 0.0, 1e-3, 0.0
init_from = ""
out_dir = "out/stage0_noise10"

# Claim 2 (FINDINGS.md), an arm: stage 0 with 20% of the text inputs replaced by one fixed token,
# <|endoftext|>, instead of random tokens.
# Then stage 1 from it:
#   python train.py config/stage1.py --init_from=out/stage0_fixed_token --out_dir=out/stage1_fixed_token
# and compare its loss with the paper's (out/stage1) and config/stage1_no_stage0.py's; then stage 2 likewise.
dataset = "lmms-lab/LLaVA-ReCap-118K"
data_format = "parquet"
mask_kind = "bidirectional"
noise_prob = 0.2
noise_token_id = 151643
vision_lr, projector_lr, language_lr = 0.0, 1e-3, 0.0
init_from = ""
out_dir = "out/stage0_fixed_token"

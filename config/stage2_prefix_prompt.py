# Claim 1 (FINDINGS.md), an arm: stage 2 under PaliGemma's prefix over image and prompt, from
# config/stage1_prefix_prompt.py's run. Compare with config/stage2.py (the paper's prefix mask): eval.py --split
# karpathy on both (a checkpoint decodes under the mask it trained with).
dataset = "lmms-lab/LLaVA-ReCap-558K"
data_format = "parquet"
mask_kind = "prefix_prompt"
noise_prob = 0.0
vision_lr, projector_lr, language_lr = 5e-6, 2e-3, 2e-5
init_from = "out/stage1_prefix_prompt"
out_dir = "out/stage2_prefix_prompt"

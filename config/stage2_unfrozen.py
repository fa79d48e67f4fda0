# Claim 3 (FINDINGS.md), an arm: no alignment first. Everything trains from the pretrained backbones and a fresh
# projector, at stage 2's rates and on the data of stages 0-2 in turn (two epochs of the COCO re-captions, then the
# 558K): the steps of the paper's stages 0-2. Compare out/stage2_unfrozen with out/stage2: eval.py --split karpathy.
data_format = "parquet"
mask_kind = "prefix"
noise_prob = 0.0
vision_lr, projector_lr, language_lr = 5e-6, 2e-3, 2e-5
init_from = ""  # SigLIP and Qwen2.5 with a fresh projector
stages = [
    dict(dataset="lmms-lab/LLaVA-ReCap-118K", epochs=2, out_dir="out/stage1_unfrozen"),
    dict(dataset="lmms-lab/LLaVA-ReCap-558K", epochs=1, out_dir="out/stage2_unfrozen"),
]

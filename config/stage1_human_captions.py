# Claim 4 (FINDINGS.md, paper 4.6), an arm: stage 1 on COCO's human captions (Karpathy's split file, train + restval,
# one sample per image and caption) instead of the machine re-captions of the same COCO images (config/stage1.py).
# Both from out/stage0; max_steps is one epoch of LLaVA-ReCap-118K (118287 / 128): compare the two loss curves.
dataset = "data/karpathy/dataset_coco.json"
data_format = "karpathy"
image_root = "data/images/coco"  # train2014/, val2014/ as the split file's filepaths name them
mask_kind = "prefix"
noise_prob = 0.0
vision_lr, projector_lr, language_lr = 0.0, 1e-3, 0.0
max_steps = 925
init_from = "out/stage0"
out_dir = "out/stage1_human_captions"

# Full-shot COCO captioning (paper 4.4, Table 6's COCO column): fine-tune stage 3 on COCO's Karpathy train + restval,
# then `python eval.py --datasets coco --checkpoint out/caption_coco`. Stage 3's model, asked zero-shot, writes the
# long descriptions and chat answers it was trained on; CIDEr rewards short COCO-style captions.
# Every caption once: data.KarpathyCaptions makes one sample per (image, reference sentence), so the one epoch is
# 566,747 samples (~4,430 steps of 128) and shows each of the 113,287 images with each of its ~5 captions, shuffled
# over the whole epoch. The 5 differ in wording; training on all of them teaches the consensus that CIDEr scores,
# and COCO caption fine-tunes count their epochs so (BLIP's coco_karpathy_train holds one entry per caption).
# The instruction is data.SHORT_CAPTION_PROMPT, which eval.py asks by default.
dataset = "data/karpathy/dataset_coco.json"  # Karpathy's caption_datasets.zip, as eval.py's --karpathy_dir
data_format = "karpathy"
image_root = "data/images/coco"  # {image_root}/{filepath}/{filename}: eval.py's --image_root + /coco
mask_kind = "prefix"
noise_prob = 0.0
# stage 3's rates (paper 4.2, Table 5), as config/pathvqa.py: the paper gives none for its fine-tunes
vision_lr, projector_lr, language_lr = 5e-6, 1e-4, 2e-5
epochs = 1
max_text_tokens = 128  # system turn, instruction and a caption: ~50 tokens after the 256 image tokens
init_from = "out/stage3"
out_dir = "out/caption_coco"
pack_length = 0  # short rows of similar length: padded to the longest in steps of 16, as config/pathvqa.py
pad_to_multiple = 16

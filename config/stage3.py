# Stage 3 (paper 3.4): multi-turn instruction data; the whole conversation is one sequence and only the
# assistant answers carry loss.
dataset = "lmms-lab/LLaVA-NeXT-Data"
data_format = "parquet"
mask_kind = "prefix"
noise_prob = 0.0
vision_lr, projector_lr, language_lr = 5e-6, 1e-4, 2e-5
max_text_tokens = 768
max_text_only_fraction = 0.2  # LLaVA-NeXT-Data holds text-only conversations too; they are counted and skipped
init_from = "out/stage2"
out_dir = "out/stage3"
pack_length = 2048  # conversations vary in length: several share a row, so little compute goes to padding
pad_to_multiple = 256  # a micro-batch of packed rows is cut to its fullest row: few shapes, little padding

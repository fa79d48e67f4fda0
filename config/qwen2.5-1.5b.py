# Qwen2.5-1.5B as the language model (issue 20); everything else is the paper's recipe. Give it after a stage's
# config, with that stage's out_dir and init_from under its own folder, e.g. for stage 2:
#   torchrun --nproc_per_node=8 train.py config/stage2.py config/qwen2.5-1.5b.py --init_from=out/1.5b/stage1 --out_dir=out/1.5b/stage2
language = "Qwen/Qwen2.5-1.5B"
projector_hidden = 1536  # LLaVA-OneVision's projector: as wide as the language model

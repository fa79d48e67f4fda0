# Qwen2.5-3B as the language model (issue 20); everything else is the paper's recipe. Give it after a stage's
# config, with that stage's out_dir and init_from under its own folder, e.g. for stage 2:
#   torchrun --nproc_per_node=8 train.py config/stage2.py config/qwen2.5-3b.py --init_from=out/3b/stage1 --out_dir=out/3b/stage2
language = "Qwen/Qwen2.5-3B"
projector_hidden = 2048  # LLaVA-OneVision's projector: as wide as the language model
distributed = "fsdp"  # weights, gradients and AdamW take 52 GiB per GPU under DDP (README), before activations
compile_mode = "default"  # compiled blocks without CUDA graphs: FSDP gathers weights outside recorded graphs

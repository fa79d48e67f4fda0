# Qwen2.5-7B as the language model (issue 20; unlike the smaller ones its output layer is not tied to the token
# embedding); everything else is the paper's recipe. Give it after a stage's config, with that stage's out_dir and
# init_from under its own folder, e.g. for stage 2:
#   torchrun --nproc_per_node=8 train.py config/stage2.py config/qwen2.5-7b.py --init_from=out/7b/stage1 --out_dir=out/7b/stage2
language = "Qwen/Qwen2.5-7B"
projector_hidden = 3584  # LLaVA-OneVision's projector: as wide as the language model
distributed = "fsdp"  # under DDP weights, gradients and AdamW alone take 120 GiB per GPU (README): sharded, 21 on 8
compile_mode = "default"  # compiled blocks without CUDA graphs: FSDP gathers weights outside recorded graphs

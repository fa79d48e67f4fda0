# The offline demo: all four stages of the paper on synthetic shapes, on a 2-core CPU in about 6 minutes.
# Same classes as the real run, small sizes, random weights: a SigLIP-shaped encoder (48 px images, 12 px
# patches -> 16 image tokens) and a Qwen2-shaped decoder with a BPE vocabulary trained on the shape captions.
# Adaptation, since nothing here is pretrained: stages 0-1 train the vision encoder with the projector (the
# real run's SigLIP already sees); the language model stays frozen there as in the paper, because the
# bidirectional mask of stage 0 would otherwise teach it to copy the next token.
vision_config = dict(image_size=48, patch_size=12, hidden_size=128, intermediate_size=256,
                     num_hidden_layers=3, num_attention_heads=4)
language_config = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True)
projector_hidden = 128
tokenizer = "shapes"
data_format = "synthetic"
dataset = "shapes"
shapes_samples = 40000
max_text_tokens = 96
pad_to_multiple = 8
num_workers = 1
device = "cpu"
dtype = "float32"
global_batch = 32
micro_batch = 32
warmup_steps = 10
checkpoint_interval = 1000
out_dir = "out/demo"
stages = [  # each stage is named by its out_dir
    dict(out_dir="out/demo/stage0", mask_kind="bidirectional", noise_prob=0.2, vision_lr=1e-3, projector_lr=1e-3,
         language_lr=0.0, max_steps=30),
    dict(out_dir="out/demo/stage1", mask_kind="prefix", vision_lr=1e-3, projector_lr=1e-3, language_lr=0.0,
         max_steps=30),
    dict(out_dir="out/demo/stage2", mask_kind="prefix", vision_lr=1e-3, projector_lr=1e-3, language_lr=1e-3,
         max_steps=900),
    dict(out_dir="out/demo/stage3", mask_kind="prefix", vision_lr=5e-4, projector_lr=5e-4, language_lr=5e-4,
         shapes_questions=2, max_steps=800),
]
eval_after = True

"""Starting configs. Comments give the seed ranges worth sweeping first."""

PRESETS = {
    "lora-small": (
        "LoRA · small model",
        """\
# LoRA on a small model. Seeds worth sweeping: learning_rate 1e-4..3e-3, lora_r 8..64.
base_model: {model}
datasets:
  - path: {dataset}
    type: {type}
sequence_len: 256
adapter: lora
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
micro_batch_size: 4
gradient_accumulation_steps: 1
max_steps: 60
learning_rate: 0.003
lr_scheduler: cosine
warmup_steps: 5
val_set_size: 0.05
eval_steps: 20
save_steps: 20
""",
    ),
    "qlora-8b": (
        "QLoRA · 7-8B model",
        """\
# QLoRA on a 7-8B model (about 10-14 GB of GPU memory at sequence_len 2048).
# Seeds worth sweeping: learning_rate 1e-4..2e-4, lora_r 16..64, num_epochs 1..3.
base_model: meta-llama/Llama-3.1-8B-Instruct
datasets:
  - path: {dataset}
    type: {type}
sequence_len: 2048
sample_packing: true
adapter: qlora
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
micro_batch_size: 2
gradient_accumulation_steps: 4
num_epochs: 1
learning_rate: 0.0002
lr_scheduler: cosine
warmup_ratio: 0.03
bf16: auto
gradient_checkpointing: true
val_set_size: 0.02
eval_steps: 100
save_steps: 200
""",
    ),
    "full-small": (
        "Full fine-tune · small model",
        """\
# Full fine-tune: every weight trains. Seeds worth sweeping: learning_rate 1e-5..1e-3.
base_model: {model}
datasets:
  - path: {dataset}
    type: {type}
sequence_len: 256
micro_batch_size: 4
max_steps: 60
learning_rate: 0.001
lr_scheduler: cosine
warmup_steps: 5
val_set_size: 0.05
eval_steps: 20
""",
    ),
}

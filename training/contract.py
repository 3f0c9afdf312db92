"""The config contract: every axolotl key is honoured, refused with a reason, or harmless — decided here, once.

`training/axolotl_keys.txt` lists the field names of axolotl 0.21.0's schema (scripts/extract_axolotl_keys.py);
tests/unit/test_config_contract.py fails when one of them is in none of the three sets, in two, or when an
honoured key names no test that proves the trainer reads it. `parse_config` applies the contract before the
pydantic model sees the data: harmless keys are dropped, refused keys set to anything but an "off" value are
errors that name the key path, and unknown keys are errors (or warnings under `strict: false`, as in axolotl).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KEYS_FILE = Path(__file__).with_name("axolotl_keys.txt")

# -- honoured: key -> the test that proves the trainer reads it ------------------------------------------------
# A value "path::function" names one test function (its source must mention the key); a bare file path names a
# file owned by another part of the project that tests the key (it must exist and mention the key).
_T = "tests/unit/test_honoured_keys.py::"
_TRAIN = "tests/unit/test_train.py::"
_CONFIG = "tests/unit/test_config.py::"
_SHARDING = "tests/unit/test_sharding.py"
_SOURCES = "tests/unit/test_sources.py"
_TEMPLATES = "tests/unit/test_chat_template.py"
_FORMATS = "tests/unit/test_formats.py"

HONOURED: dict[str, str] = {
    # model, tokenizer, adapter
    "base_model": _T + "test_base_model_and_datasets_are_what_trains",
    "trust_remote_code": _CONFIG + "test_trust_remote_code_needs_the_site_setting",
    "adapter": _TRAIN + "test_loss_falls",
    "lora_r": _T + "test_lora_keys_shape_the_adapter",
    "lora_alpha": _T + "test_lora_keys_shape_the_adapter",
    "lora_dropout": _T + "test_lora_keys_shape_the_adapter",
    "lora_target_modules": _T + "test_lora_keys_shape_the_adapter",
    "lora_target_linear": _T + "test_lora_keys_shape_the_adapter",
    "lora_target_parameters": "tests/unit/test_architectures.py::test_lora_target_parameters_put_lora_on_the_experts",
    "quantize_moe_experts": "tests/unit/test_architectures.py::test_quantize_moe_experts_stores_experts_in_4_bit",
    "lora_modules_to_save": _T + "test_lora_keys_shape_the_adapter",
    "peft_use_dora": _T + "test_lora_keys_shape_the_adapter",
    "peft_use_rslora": _T + "test_lora_keys_shape_the_adapter",
    "load_in_4bit": _T + "test_bnb_config_kwargs_reach_the_quantization_config",
    "load_in_8bit": _T + "test_bnb_config_kwargs_reach_the_quantization_config",
    "bnb_config_kwargs": _T + "test_bnb_config_kwargs_reach_the_quantization_config",
    "merge_lora": _TRAIN + "test_merge_lora_saves_a_merged_model_with_gradient_checkpointing",
    "unfrozen_parameters": _T + "test_unfrozen_parameters_leave_only_matching_weights_trainable",
    "attn_implementation": _T + "test_attention_keys_pick_the_backend",
    "flash_attention": _T + "test_attention_keys_pick_the_backend",
    "sdp_attention": _T + "test_attention_keys_pick_the_backend",
    "eager_attention": _T + "test_attention_keys_pick_the_backend",
    "flex_attention": _T + "test_attention_keys_pick_the_backend",
    "experts_implementation": _T + "test_experts_implementation_reaches_the_model",
    "special_tokens": _T + "test_special_tokens_and_eot_tokens_reach_the_tokenizer",
    "tokenizer_use_mistral_common": "tests/unit/test_mistral_common.py::test_mistral_common_trains_assistant_turns",
    "gradient_checkpointing": _T + "test_gradient_checkpointing_kwargs_are_passed_through",
    "gradient_checkpointing_kwargs": _T + "test_gradient_checkpointing_kwargs_are_passed_through",
    "activation_offloading": _T + "test_activation_offloading_saves_activations_through_the_offload_hooks",
    # data
    "datasets": _T + "test_base_model_and_datasets_are_what_trains",
    "val_set_size": _TRAIN + "test_packed_training_reports_efficiency_and_eval_loss",
    "sequence_len": _T + "test_data_keys_shape_the_batches",
    "excess_length_strategy": _FORMATS,
    "train_on_inputs": _FORMATS,
    "chat_template": _TEMPLATES,
    "chat_template_jinja": _TEMPLATES,
    "eot_tokens": _T + "test_special_tokens_and_eot_tokens_reach_the_tokenizer",
    "sample_packing": _TRAIN + "test_packed_training_reports_efficiency_and_eval_loss",
    "pad_to_sequence_len": _T + "test_data_keys_shape_the_batches",
    "group_by_length": _T + "test_training_arguments_follow_the_config",
    # optimisation
    "micro_batch_size": _T + "test_training_arguments_follow_the_config",
    "eval_batch_size": _T + "test_training_arguments_follow_the_config",
    "gradient_accumulation_steps": _T + "test_training_arguments_follow_the_config",
    "num_epochs": _T + "test_training_arguments_follow_the_config",
    "max_steps": _T + "test_training_arguments_follow_the_config",
    "learning_rate": _T + "test_training_arguments_follow_the_config",
    "lr_scheduler": _T + "test_schedulers_follow_axolotl",
    "lr_scheduler_kwargs": _T + "test_schedulers_follow_axolotl",
    "cosine_min_lr_ratio": _T + "test_schedulers_follow_axolotl",
    "warmup_steps": _T + "test_training_arguments_follow_the_config",
    "warmup_ratio": _T + "test_training_arguments_follow_the_config",
    "optimizer": _T + "test_torchao_low_bit_optimizers_step_on_the_cpu",
    "adam_beta1": _T + "test_training_arguments_follow_the_config",
    "adam_beta2": _T + "test_training_arguments_follow_the_config",
    "adam_epsilon": _T + "test_training_arguments_follow_the_config",
    "weight_decay": _T + "test_training_arguments_follow_the_config",
    "max_grad_norm": _T + "test_training_arguments_follow_the_config",
    "neftune_noise_alpha": _T + "test_training_arguments_follow_the_config",
    "full_determinism": _T + "test_training_arguments_follow_the_config",
    "seed": _T + "test_training_arguments_follow_the_config",
    "bf16": _T + "test_bf16_true_trains_in_bf16_on_the_cpu",
    "fp16": _T + "test_fp16_is_refused_without_cuda_and_reaches_the_trainer_with_it",
    "tf32": _T + "test_tf32_sets_the_cuda_matmul_precision_and_is_a_no_op_on_the_cpu",
    "torch_compile": _T + "test_torch_compile_reaches_the_training_arguments",
    # evaluation, checkpoints, stopping
    "eval_steps": _T + "test_training_arguments_follow_the_config",
    "save_steps": _T + "test_training_arguments_follow_the_config",
    "evals_per_epoch": _T + "test_per_epoch_counts_become_steps_as_in_axolotl",
    "saves_per_epoch": _T + "test_per_epoch_counts_become_steps_as_in_axolotl",
    "eval_strategy": _T + "test_training_arguments_follow_the_config",
    "save_strategy": _T + "test_training_arguments_follow_the_config",
    "save_total_limit": _T + "test_checkpoints_are_written_and_capped_and_resume",
    "save_only_model": _T + "test_training_arguments_follow_the_config",
    "early_stopping_patience": _T + "test_early_stopping_patience_stops_a_run_whose_eval_loss_rises",
    "loss_watchdog_threshold": _T + "test_loss_watchdog_stops_a_diverging_run",
    "loss_watchdog_patience": _T + "test_loss_watchdog_stops_a_diverging_run",
    "dataloader_drop_last": _T + "test_training_arguments_follow_the_config",
    "profiler_steps": _T + "test_profiler_steps_keep_a_trace_as_a_run_artifact",
    "profiler_steps_start": _T + "test_profiler_steps_keep_a_trace_as_a_run_artifact",
    # image + text rows (training/multimodal.py)
    "processor_type": "tests/unit/test_multimodal.py::test_processor_type_trains_image_rows_with_the_models_processor",
    "processor_kwargs": "tests/unit/test_multimodal.py::test_processor_kwargs_reach_the_image_processor",
    "skip_prepare_dataset": "tests/unit/test_multimodal.py::test_skip_prepare_dataset_says_when_pixels_are_made",
    # plugins: Liger applied on CUDA (refused by check_environment elsewhere); the others refused (PLUGINS)
    "plugins": _T + "test_liger_is_refused_without_cuda_and_applied_as_the_flags_say_with_it",  # and CCE's test
    **{
        flag: _T + "test_liger_is_refused_without_cuda_and_applied_as_the_flags_say_with_it"
        for flag in (
            "liger_rope liger_rms_norm liger_rms_norm_gated liger_layer_norm liger_glu_activation liger_swiglu "
            "liger_cross_entropy liger_fused_linear_cross_entropy"
        ).split()
    },
    "cut_cross_entropy": _T + "test_cut_cross_entropy_is_refused_without_cuda_and_gives_the_same_loss_with_it",
    # sharding (training/sharding.py)
    "fsdp": _SHARDING,
    "fsdp_config": _SHARDING,
    "fsdp_version": _SHARDING,
    "deepspeed": _SHARDING,
}

# Keys of one `datasets:` entry, written "datasets[].key".
HONOURED_DATASET: dict[str, str] = {
    "path": _T + "test_base_model_and_datasets_are_what_trains",
    "type": _FORMATS,
    "split": _SOURCES,
    "data_files": _SOURCES,
    "ds_type": _SOURCES,
    "field_messages": _TEMPLATES,
    "message_property_mappings": _TEMPLATES,
    "message_field_role": _T + "test_dataset_field_names_are_read",
    "message_field_content": _T + "test_dataset_field_names_are_read",
    "roles": _TEMPLATES,
    "roles_to_train": _TEMPLATES,
    "train_on_eos": _TEMPLATES,
    "train_on_eot": _TEMPLATES,
    "message_field_training": _TEMPLATES,
    "message_field_training_detail": _TEMPLATES,
    "chat_template": _TEMPLATES,
    "chat_template_jinja": _TEMPLATES,
    "drop_system_message": _TEMPLATES,
    "field_thinking": _T + "test_reasoning_trace_keys_reach_the_template",
    "template_thinking_key": _T + "test_reasoning_trace_keys_reach_the_template",
    "split_thinking": _T + "test_reasoning_trace_keys_reach_the_template",
    "field_system": _T + "test_dataset_field_names_are_read",
    "field": _T + "test_dataset_field_names_are_read",
    "field_instruction": _T + "test_dataset_field_names_are_read",
    "field_input": _T + "test_dataset_field_names_are_read",
    "field_output": _T + "test_dataset_field_names_are_read",
    "field_segments": _T + "test_dataset_field_names_are_read",
}


# -- refused: key -> why, what instead, and the values that mean "off" (accepted, no effect) ------------------
@dataclass(frozen=True)
class Refusal:
    why: str
    instead: str
    # Values accepted because they ask for nothing (axolotl's own default or "off"); None, False and empty
    # containers always are. A callable gets (value, whole config mapping).
    off: tuple = ()
    off_when: Callable[[Any, dict], bool] | None = None

    def accepts(self, value: Any, data: dict) -> bool:
        if value is None or value is False or value == "" or value == [] or value == {}:
            return True
        if any(value == off and type(value) is type(off) for off in self.off):
            return True
        return bool(self.off_when and self.off_when(value, data))

    def message(self) -> str:
        return f"{self.why}; {self.instead}"


def _family(keys: str, why: str, instead: str, **kw) -> dict[str, Refusal]:
    return {k: Refusal(why, instead, **kw) for k in keys.split()}


def _same_as_base_model(value: Any, data: dict) -> bool:
    return value == data.get("base_model")


REMOVE = "remove it"
_RESUME = "remove it; resume the run from its page or `trainyard train --resume`"
REFUSED: dict[str, Refusal] = {
    "fsdp_final_state_dict_type": Refusal("the old place of this FSDP option", "write fsdp_config.state_dict_type"),
    **_family(
        "rl rl_beta dpo_beta dpo_label_smoothing dpo_ld_alpha dpo_loss_type dpo_loss_weights dpo_norm_loss "
        "dpo_padding_free dpo_use_liger_kernel dpo_use_logits_to_keep dpo_use_weighting dpo_generate_during_eval "
        "kto_desirable_weight kto_undesirable_weight orpo_alpha cpo_alpha simpo_gamma rpo_alpha trl reward_model "
        "process_reward_model center_rewards_coefficient precompute_ref_log_probs max_prompt_len num_labels vllm "
        "ebft balance_labels label_balance_window_optim_steps cls_model_config",
        "preference and reinforcement training (DPO, KTO, ORPO, GRPO, reward models) is not part of Trainyard, "
        "which trains supervised fine-tuning only",
        "remove it and train SFT, or use axolotl for this run",
    ),
    **_family(
        "tensor_parallel_size context_parallel_size sequence_parallel_degree dp_shard_size dp_replicate_size",
        "Trainyard shards with FSDP2/DeepSpeed (fsdp_config, deepspeed) but has no tensor, context or sequence "
        "parallelism",
        "remove it (or set it to 1) and use fsdp_config to spread a large model over the run's GPUs",
        off=(1,),
    ),
    **_family(
        "heads_k_stride ring_attn_func deepcompile ddp ddp_timeout ddp_bucket_cap_mb ddp_broadcast_buffers "
        "ddp_find_unused_parameters world_size device device_map max_memory gpu_memory_limit use_ray ray_run_name "
        "ray_num_workers resources_per_worker torchdistx_path accelerator_config lora_on_cpu "
        "experimental_skip_move_to_device",
        "Trainyard places the model itself (the run's GPUs, or the CPU) and launches the processes",
        "remove it; pick the number of GPUs on the run instead",
    ),
    **_family(
        "gptq qat quantization fp8 fp8_config fp8_enable_fsdp_float8_all_gather model_quantization_config "
        "model_quantization_config_kwargs nf4_backend qlora_sharded_model_loading use_onebitllms nvfp4_merge_aware",
        "Trainyard quantizes with bitsandbytes only (load_in_4bit / load_in_8bit); GPTQ, QAT, FP8 and other "
        "quantization schemes are not implemented",
        "use adapter: qlora (4-bit) or load_in_8bit with adapter: lora",
    ),
    **_family(
        "adam_beta3 adam_epsilon2 optim_args optim_target_modules qgalore_cos_threshold qgalore_gamma_proj "
        "qgalore_proj_bits qgalore_proj_group_size qgalore_proj_quant qgalore_proj_type qgalore_queue_size "
        "qgalore_rank qgalore_scale qgalore_update_proj_gap dion_lr dion_momentum dion_rank_fraction "
        "dion_rank_multiple_of loraplus_lr_ratio loraplus_lr_embedding embedding_lr embedding_lr_scale lr_groups "
        "lr_div_factor lr_quadratic_warmup cosine_constant_lr_ratio jagged_restart_steps jagged_restart_warmup_steps "
        "jagged_restart_anneal_steps relora relora_cpu_offload relora_prune_method relora_prune_ratio "
        "lisa_n_layers lisa_step_interval lisa_layers_attribute",
        "this optimizer or learning-rate variant of axolotl is not implemented in Trainyard",
        "use optimizer/lr_scheduler with transformers' names (lr_scheduler_kwargs for scheduler options)",
    ),
    **_family(
        "xformers_attention s2_attention sage_attention flash_attn_cross_entropy flash_attn_rms_norm "
        "flash_attn_fuse_mlp flash_attn_d512 fused_attn_kernel large_head_attention sdpa_varlen "
        "fa_varlen_kwargs_in_collator scaling_softmax scaling_softmax_factor scaling_softmax_bias "
        "flex_attn_compile_kwargs flash_optimum gemma4_hybrid_attn_impl chunked_cross_entropy "
        "chunked_cross_entropy_num_chunks "
        "tiled_mlp tiled_mlp_num_shards tiled_mlp_use_original_mlp llama4_linearized_experts ple_cpu_offload "
        "layer_offloading",
        "this attention or kernel patch of axolotl is not implemented in Trainyard",
        "remove it; choose the attention with attn_implementation (sdpa, eager, flex_attention, flash_attention_2)",
    ),
    **_family(
        "lora_qkv_kernel lora_o_kernel lora_mlp_kernel lora_embedding_kernel",
        "axolotl's fused LoRA Triton kernels are not part of Trainyard",
        "set it to false (the standard PEFT LoRA layers are used)",
    ),
    **_family(
        "peft peft_layer_replication peft_layers_pattern peft_layers_to_transform peft_init_lora_weights "
        "peft_trainable_token_indices peft_autocast_adapter_dtype peft_ensure_weight_tying lora_alpha_pattern "
        "lora_rank_pattern lora_fp32_gradients mixlora_num_experts mixlora_top_k mixlora_expert_lora_r "
        "mixlora_expert_lora_alpha mixlora_expert_lora_dropout mixlora_jitter_noise mixlora_router_aux_loss_coef "
        "mixlora_router_init_range",
        "this PEFT option is not passed to the adapter by Trainyard",
        "remove it; the adapter takes lora_r, lora_alpha, lora_dropout, lora_target_*, lora_modules_to_save, "
        "peft_use_dora and peft_use_rslora",
    ),
    "lora_fan_in_fan_out": Refusal(
        "fan-in/fan-out weights (GPT-2 Conv1D) are not supported", "remove it (models with nn.Linear need nothing)"
    ),
    "lora_model_dir": Refusal(
        "starting from an existing adapter is not supported yet", "remove it; train a new adapter from base_model"
    ),
    "peft_autocast_adapter_dtype": Refusal("adapter dtype casting is left to PEFT's default", REMOVE, off=(True,)),
    "peft_init_lora_weights": Refusal(
        "LoRA weights start as PEFT's default (B = 0); other initialisations are not passed", REMOVE, off=(True,)
    ),
    **_family(
        "test_datasets pretraining_dataset streaming streaming_multipack_buffer_size preprocess_iterable "
        "pretrain_multipack_attn pretrain_multipack_buffer_size pretraining_sample_concatenation curriculum_sampling "
        "sample_packing_sequentially dataset_exact_deduplication dataset_shard_num dataset_shard_idx min_sample_len "
        "batch_flattening multipack_real_batches default_system_message added_tokens_overrides tokens "
        "chat_template_kwargs tokenizer_legacy use_pose pose_max_context_len pose_num_chunks pose_split_on_token_ids "
        "eval_sequence_len pad_to_multiple_of max_packed_sequence_len",
        "this data option of axolotl is not implemented in Trainyard",
        "remove it; datasets take path/type/split/data_files and the chat-template keys, and val_set_size holds "
        "rows out for evaluation",
    ),
    "shuffle_merged_datasets": Refusal("Trainyard always shuffles the merged datasets", REMOVE, off=(True,)),
    "shuffle_before_merging_datasets": Refusal("datasets are shuffled after merging only", REMOVE),
    "tokenizer_use_fast": Refusal("Trainyard always loads the fast (Rust) tokenizer", REMOVE, off=(True,)),
    "tokenizer_config": Refusal(
        "the tokenizer is always loaded from base_model", "remove it", off_when=_same_as_base_model
    ),
    "base_model_config": Refusal(
        "the model config is always read from base_model", "remove it", off_when=_same_as_base_model
    ),
    # A model or tokenizer class name is what the Auto classes pick from the model's own files anyway.
    "model_type": Refusal(
        "Trainyard loads the model with AutoModelForCausalLM (the class its config.json names)",
        "remove it",
        off_when=lambda value, _: isinstance(value, str)
        and value.endswith(("ForCausalLM", "ForConditionalGeneration")),
    ),
    "tokenizer_type": Refusal(
        "Trainyard loads the tokenizer with AutoTokenizer (the class its files name)",
        "remove it",
        off_when=lambda value, _: isinstance(value, str) and value.endswith(("Tokenizer", "TokenizerFast")),
    ),
    **_family(
        "model_config model_kwargs model_revision reinit_weights resize_token_embeddings_to_32x "
        "mean_resizing_embeddings shrink_embeddings embeddings_skip_upcast fix_untrained_tokens fp32_norms "
        "fp32_norm_classes float16 float32 bfloat16 rope_scaling noisy_embedding_alpha use_dft use_eaft eaft_alpha "
        "eaft_k trainer_cls diffusion_lm dynamic_checkpoint selective_checkpointing export auto_find_batch_size "
        "batch_size evaluation_strategy save_first_step load_best_model_at_end metric_for_best_model "
        "greater_is_better do_bench_eval bench_dataset bench_split do_causal_lm_eval eval_causal_lm_metrics "
        "eval_on_start merge_method torch_compile_backend torch_compile_mode torch_compile_options "
        "torch_compile_regional sync_profiler_steps sync_profiler_start_step resume_from_checkpoint "
        "auto_resume_from_checkpoints dataloader_num_workers save_safetensors",
        "this option of axolotl is not implemented in Trainyard",
        "remove it",
    ),
    "resume_from_checkpoint": Refusal("a run resumes from its own checkpoints", _RESUME),
    "auto_resume_from_checkpoints": Refusal("a run resumes from its own checkpoints", _RESUME),
    "load_best_model_at_end": Refusal(
        "the saved model is the last step's", "remove it; pick a checkpoint from the run's checkpoints instead"
    ),
    "noisy_embedding_alpha": Refusal("the old name of neftune_noise_alpha", "write neftune_noise_alpha instead"),
    "evaluation_strategy": Refusal("the old name of eval_strategy", "write eval_strategy instead"),
    "batch_size": Refusal("the old name of the batch size", "write micro_batch_size instead"),
    "bfloat16": Refusal("loads the weights in bf16 without mixed precision", "write bf16: true instead"),
    "float16": Refusal("loads the weights in fp16 without mixed precision", "write fp16: true instead (CUDA only)"),
    "dataloader_num_workers": Refusal(
        "batches are built in the training process (the data is encoded in memory)", REMOVE, off=(0,)
    ),
    "save_safetensors": Refusal("weights are always saved as safetensors", REMOVE, off=(True,)),
    **_family(
        "image_size image_resize_algorithm",
        "resizing images before the processor is not implemented in Trainyard (the model's processor sizes them)",
        "remove it; bound image sizes with processor_kwargs (e.g. max_pixels for Qwen)",
    ),
    "role_boundaries": Refusal(
        "image rows are masked by their chat template's turns as text rows are (roles_to_train, train_on_eos), "
        "so axolotl's token-marker boundaries are not read",
        REMOVE,
    ),
    "freeze_mm_modules": Refusal(
        "freezing the vision and audio towers is not implemented as its own switch",
        "remove it; train the language model only with unfrozen_parameters: ['model.language_model.*'] or an adapter",
    ),
    "remove_unused_columns": Refusal(
        "the trainer keeps the columns it builds", "remove it (false is what Trainyard does)"
    ),
    "use_kernels": Refusal(
        "use_kernels downloads compiled kernels from the Hugging Face Hub (transformers' kernelize, the kernels "
        "package) at load time; Trainyard does not pass it to the model, and this offline server could not fetch "
        "them",
        "remove it; the model's own PyTorch layers are used",
    ),
    "use_scattermoe": Refusal(
        "ScatterMoE is axolotl's Triton kernel for MoE experts (CUDA only) and is not part of Trainyard",
        "remove it, or set experts_implementation: grouped_mm (or batched_mm, eager)",
    ),
}

# Plugins' own keys (valid in axolotl when the plugin is listed). Liger and Cut Cross Entropy are Triton
# kernels: measured here, both fail on the CPU with "0 active drivers" (no GPU for Triton).
REFUSED.update(
    _family(
        "liger_use_token_scaling liger_kernel_impl",
        "this Liger option (token scaling, cuTile/CuTe kernels) is not passed to liger-kernel by Trainyard",
        "remove it",
    )
)
REFUSED.update(
    _family(
        "cut_cross_entropy_accum_c_fp32 cut_cross_entropy_c_grad_chunk_size",
        "this Cut Cross Entropy option is not passed to the kernel by Trainyard (its defaults are used)",
        "remove it",
    )
)
REFUSED.update(
    _family(
        "expert_backend nonexpert_quantization moe_grouped_backend moe_dequant_chunk_size moe_bnb_fast "
        "autotune_cache_path autotune_profiles autotune_neighborhood use_sonicmoe use_dsv4_kernels "
        "use_glm_dsa_kernels dsv4_bf16_all dsv4_fp4_grouped_mode dsv4_fp8_lora_kernel dsv4_fp8_nonexpert_mode "
        "dsv4_shared_mlp_lora_kernel gemma4_fp8_nonexpert gemma4_nf4_nonexpert nvfp4_merge_aware_start_step",
        "axolotl's kernels plugin (CUDA MoE kernels) is not part of Trainyard",
        "remove it; set experts_implementation (grouped_mm, batched_mm, eager) for MoE models",
    )
)

REFUSED_DATASET: dict[str, Refusal] = {
    **_family(
        "conversation field_human field_model",
        "legacy fastchat/ShareGPT options are not read",
        "use type: chat_template with message_property_mappings (role: from, content: value)",
    ),
    "field_tools": Refusal("rows' tools are read from the `tools` field", "rename the field to tools", off=("tools",)),
    **_family(
        "input_format input_transform logprobs_field temperature preprocess_shards shards shards_idx revision name "
        "trust_remote_code weight",
        "this dataset option of axolotl is not implemented in Trainyard",
        "remove it from the dataset entry",
    ),
}

# Plugins Trainyard applies (check_environment refuses them where the machine can't run them).
APPLIED_PLUGINS = {
    "axolotl.integrations.liger.LigerPlugin": "Liger kernels, on a CUDA GPU",
    "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin": "the loss by Cut Cross Entropy, on a CUDA GPU",
}
# Plugins refused, by the names axolotl's configs list them under `plugins:`.
PLUGINS: dict[str, Refusal] = {
    "axolotl.integrations.kernels.KernelsPlugin": Refusal(
        "axolotl's kernels plugin (CUDA MoE kernels) is not part of Trainyard",
        "remove it from plugins; set experts_implementation for MoE models",
    ),
}

# -- harmless: logging, tracking, hub and bookkeeping keys with no effect on the trained weights ---------------
HARMLESS: dict[str, str] = {
    **{k: "experiment tracking (Trainyard records its own metrics)" for k in (
        "use_wandb wandb_project wandb_entity wandb_watch wandb_name wandb_run_id wandb_mode wandb_log_model "
        "use_mlflow mlflow_tracking_uri mlflow_experiment_name mlflow_run_name hf_mlflow_log_artifacts use_comet "
        "comet_api_key comet_workspace comet_project_name comet_experiment_key comet_mode comet_online "
        "comet_experiment_config use_trackio trackio_project_name trackio_run_name trackio_space_id "
        "use_otel_metrics otel_metrics_host otel_metrics_port use_tensorboard include_tkps "
        "include_tokens_per_second logging_steps logging_nan_inf_filter eval_table_size eval_max_new_tokens "
        "generate_samples num_generation_samples generation_max_new_tokens generation_temperature generation_top_k "
        "generation_top_p generation_do_sample generation_prompt_ratio gradio_title gradio_share gradio_server_name "
        "gradio_server_port gradio_max_new_tokens gradio_temperature"
    ).split()},
    **{k: "publishing to the Hub (Trainyard keeps artifacts with the run)" for k in (
        "hub_model_id hub_strategy hub_revision push_dataset_to_hub hf_use_auth_token num_dataset_shards_to_save"
    ).split()},
    **{k: "where files go and how preprocessing runs (the server decides; weights are unchanged)" for k in (
        "output_dir dataset_prepared_path dataset_processes dataset_num_proc dataset_keep_in_memory "
        "tokenizer_save_jinja_files is_preprocess axolotl_config_path local_rank low_cpu_mem_usage gc_steps "
        "gc_collect_steps torch_empty_cache_steps sample_packing_bin_size sample_packing_group_size "
        "sample_packing_eff_est sample_packing_mp_start_method eval_sample_packing total_num_tokens "
        "total_supervised_tokens dataloader_pin_memory dataloader_prefetch_factor"
    ).split()},
    **{k: "a hint axolotl no longer reads" for k in (
        "is_llama_derived_model is_mistral_derived_model is_falcon_derived_model is_qwen_derived_model"
    ).split()},
    "strict": "axolotl's switch for unknown keys: under strict: false they warn instead of failing",
    "debug": "axolotl's debug logging",
}


@dataclass
class ContractResult:
    data: dict  # what the pydantic model gets: harmless and "off" keys dropped, legacy names mapped
    errors: list[tuple[str, str]] = field(default_factory=list)  # (key path, message)
    warnings: list[str] = field(default_factory=list)


def apply_contract(raw: dict, known_fields: set[str], known_dataset_fields: set[str]) -> ContractResult:
    """Sort the keys of a raw config: refused ones become errors at their path, harmless ones are dropped,
    unknown ones are errors (warnings under `strict: false`). Honoured keys go on to the pydantic model."""
    lenient = raw.get("strict") is False
    result = ContractResult({})
    # As in axolotl, a key left empty (`fp16:`) is unset.
    data = {k: v for k, v in raw.items() if v is not None}
    for key, value in data.items():
        if key in HARMLESS:
            continue
        if key == "plugins" and isinstance(value, list):
            for i, name in enumerate(value):
                if name in APPLIED_PLUGINS:
                    continue
                refusal = PLUGINS.get(name)
                why = refusal.message() if refusal else f"unknown plugin {name!r}; remove it from plugins"
                result.errors.append((f"plugins[{i}]", why))
            result.data[key] = value
            continue
        # A field of the config model is read by the trainer: it wins here, and the contract test says
        # when it is still listed as refused or harmless (a key is in exactly one set).
        if key in REFUSED and key not in known_fields:
            if not REFUSED[key].accepts(value, data):
                result.errors.append((key, REFUSED[key].message()))
            continue
        if key not in known_fields and key not in LEGACY_ATTENTION:
            _unknown(key, lenient, result)
            continue
        result.data[key] = value
    _map_legacy_attention(result.data)
    if isinstance(result.data.get("datasets"), list):
        result.data["datasets"] = [
            _dataset_entry(i, d, known_dataset_fields, lenient, result) if isinstance(d, dict) else d
            for i, d in enumerate(result.data["datasets"])
        ]
    return result


def _dataset_entry(i: int, entry: dict, known: set[str], lenient: bool, result: ContractResult) -> dict:
    kept = {}
    for key, value in entry.items():
        if value is None:
            continue
        if key in REFUSED_DATASET and key not in known:
            if not REFUSED_DATASET[key].accepts(value, entry):
                result.errors.append((f"datasets[{i}].{key}", REFUSED_DATASET[key].message()))
            continue
        if key not in known:
            _unknown(f"datasets[{i}].{key}", lenient, result)
            continue
        kept[key] = value
    return kept


def _unknown(path: str, lenient: bool, result: ContractResult) -> None:
    if lenient:
        result.warnings.append(f"{path}: unknown key, ignored (strict: false)")
    else:
        result.errors.append((path, "unknown key (not an axolotl option Trainyard supports)"))


# Axolotl's legacy attention switches, mapped to attn_implementation (an explicit attn_implementation wins).
LEGACY_ATTENTION = {
    "flash_attention": "flash_attention_2",
    "sdp_attention": "sdpa",
    "eager_attention": "eager",
    "flex_attention": "flex_attention",
}


def _map_legacy_attention(data: dict) -> None:
    for key, backend in LEGACY_ATTENTION.items():
        if data.pop(key, None) and "attn_implementation" not in data:
            data["attn_implementation"] = backend


def axolotl_keys() -> dict[str, set[str]]:
    """Section ("top", "dataset", "plugin:<name>") -> field names, from the committed list."""
    sections: dict[str, set[str]] = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            section, name = line.rsplit(": ", 1)
            sections.setdefault(section, set()).add(name.strip())
    return sections

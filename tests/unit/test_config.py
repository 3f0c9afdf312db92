"""The config schema: axolotl keys, errors that name the key path, checks done before anything is queued."""

from __future__ import annotations

import pytest

from tests.helpers import dump_config
from training.config import ConfigInvalid, check_environment, parse_config

BASE = "base_model: tiny\ndatasets:\n  - path: d.jsonl\n    type: chat_template\n"


def errors_of(text, **kw) -> list[str]:
    with pytest.raises(ConfigInvalid) as info:
        parse_config(text, **kw)
    return [str(e) for e in info.value.errors]


def test_minimal_config_gets_axolotl_defaults():
    config = parse_config(BASE)
    assert config.sequence_len == 512 and config.train_on_inputs is False
    spec = config.datasets[0]
    assert spec.roles_to_train == ["assistant"] and spec.train_on_eos == "turn" and spec.eot_policy == "turn"


def test_errors_name_the_key_path():
    errs = errors_of(BASE.replace("type: chat_template", "type: sharegpt_v9") + "lora_r: -1\nmicro_batch_size: x\n")
    assert any(e.startswith("datasets[0].type: unknown dataset type 'sharegpt_v9'") for e in errs)
    assert any(e.startswith("lora_r:") for e in errs)
    assert any(e.startswith("micro_batch_size:") for e in errs)


def test_unknown_key_is_named():
    assert errors_of(BASE + "learning_rat: 0.1\n") == [
        "learning_rat: unknown key (not an axolotl option Trainyard supports)"
    ]


def test_plain_axolotl_keys_that_we_do_not_use_are_accepted():
    config = parse_config(BASE + "output_dir: ./out\nwandb_project: x\nstrict: false\nflash_attention: true\n")
    assert config.attn_implementation == "flash_attention_2"


def test_yaml_syntax_error_gives_line():
    assert "invalid YAML: line 2, column 6" in errors_of("base_model: x\nfoo: : :\n")[0]


def test_qlora_implies_4bit_and_full_finetune_refuses_quantized_weights():
    assert parse_config(BASE + "adapter: qlora\n").load_in_4bit
    assert any("can't be fully fine-tuned" in e for e in errors_of(BASE + "load_in_4bit: true\n"))


def test_trust_remote_code_needs_the_site_setting():
    assert errors_of(BASE + "trust_remote_code: true\n")[0].startswith("trust_remote_code:")
    assert parse_config(BASE + "trust_remote_code: true\n", allow_trust_remote_code=True).trust_remote_code


def test_packing_is_refused_with_a_backend_that_cannot_isolate_samples(monkeypatch):
    # Every backend listed today isolates packed samples (flex builds a block mask from position_ids);
    # the check stays for one that would not.
    from training import config as config_module

    leaky = config_module.AttentionBackend(isolates_packed_samples=False, needs_cuda=False, needs_package=None)
    monkeypatch.setitem(config_module.ATTENTION_BACKENDS, "eager", leaky)
    errs = errors_of(BASE + "sample_packing: true\nattn_implementation: eager\n")
    assert "attend to each other" in errs[0]


def test_flash_attention_without_cuda_or_package_is_refused_up_front():
    config = parse_config(BASE + "attn_implementation: flash_attention_2\n")
    problems = [str(p) for p in check_environment(config, cuda_available=False)]
    assert any("needs a CUDA GPU" in p for p in problems)
    assert check_environment(parse_config(BASE), cuda_available=False) == []


def test_export_round_trips():
    config = parse_config(BASE + "adapter: lora\nlora_r: 16\n")
    assert parse_config(dump_config(config)) == config


AXOLOTL_EXAMPLE = """\
base_model: NousResearch/Meta-Llama-3.1-8B
load_in_8bit: true
load_in_4bit: false
datasets:
  - path: data.jsonl
    type: chat_template
    field_messages: messages
    roles_to_train:
dataset_prepared_path:
val_set_size: 0.05
output_dir: ./outputs/lora-out
sequence_len: 4096
sample_packing: true
adapter: lora
lora_model_dir:
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
lora_fan_in_fan_out:
wandb_project:
wandb_entity:
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 4
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002
train_on_inputs: false
bf16: auto
fp16:
tf32: false
gradient_checkpointing: true
logging_steps: 1
loss_watchdog_threshold: 5.0
loss_watchdog_patience: 3
warmup_steps: 10
evals_per_epoch: 4
saves_per_epoch: 1
weight_decay: 0.0
"""


def test_a_plain_axolotl_example_imports_with_empty_keys_unset():
    config = parse_config(AXOLOTL_EXAMPLE)
    assert config.fp16 is False and config.datasets[0].roles_to_train == ["assistant"]
    assert config.optimizer == "adamw_bnb_8bit" and config.load_in_8bit


@pytest.mark.parametrize(
    "line, key, words",
    [
        ("optimizer: adamw_torh", "optimizer", "did you mean adamw_torch"),
        ("lr_scheduler: cosin", "lr_scheduler", "did you mean cosine"),
        ("lora_fan_in_fan_out: true", "lora_fan_in_fan_out", "not supported"),
        ("lora_model_dir: ./previous-adapter", "lora_model_dir", "not supported yet"),
    ],
)
def test_typos_and_unsupported_settings_name_the_key(line, key, words):
    with pytest.raises(ConfigInvalid) as refused:
        parse_config(BASE + line + "\n")
    (error,) = refused.value.errors
    assert error.path == key and words in error.message


def test_the_optimizer_names_we_know_are_transformers_names():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from training.config import KNOWN_OPTIMIZERS, KNOWN_SCHEDULERS

    assert KNOWN_OPTIMIZERS <= {o.value for o in OptimizerNames}
    assert KNOWN_SCHEDULERS <= {s.value for s in SchedulerType}

"""Sharded training (FSDP2, DeepSpeed ZeRO): axolotl's keys, checks against the machine, the
Trainer's arguments and the accelerate config a multi-process launch uses.

One run is sharded when its config says `fsdp_config`/`fsdp` or `deepspeed`. The config keys are
parsed here (TrainConfig includes them as one block); `trainer_kwargs` turns them into
TrainingArguments' `fsdp`/`fsdp_config`/`deepspeed`, and `accelerate_config` writes the file that
`accelerate launch --config_file` reads, so the launcher and the Trainer agree on what runs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEEPSPEED_PRESETS_DIR = Path(__file__).parent / "deepspeed_configs"

# axolotl (and accelerate's config files) spell every fsdp_config key with an `fsdp_` prefix too.
_LEGACY_PREFIX = "fsdp_"
# FSDP1 knobs FSDP2 has no use for: accepted (old configs carry them), with a warning that they do nothing.
_FSDP1_ONLY = {"use_orig_params", "sync_module_states", "forward_prefetch", "backward_prefetch", "limit_all_gathers"}


class FsdpConfig(BaseModel):
    """axolotl's `fsdp_config:` block (FSDP2)."""

    model_config = ConfigDict(extra="forbid")

    fsdp_version: int = Field(2, description="only 2 (FSDP2, torch's fully_shard) is supported")
    offload_params: bool = Field(False, description="keep sharded parameters in CPU memory between uses")
    cpu_ram_efficient_loading: bool = Field(False, description="only rank 0 reads the weights; others get shards")
    auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"] = "TRANSFORMER_BASED_WRAP"
    transformer_layer_cls_to_wrap: list[str] | str | None = Field(
        None, description="decoder layer class, e.g. Qwen3DecoderLayer; default: the model's _no_split_modules"
    )
    min_num_params: int = Field(0, ge=0, description="SIZE_BASED_WRAP: smallest module wrapped on its own")
    state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT"] = "FULL_STATE_DICT"
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP"] | None = Field(
        None, description="FSDP1 name; FULL_SHARD = reshard_after_forward true, SHARD_GRAD_OP = false"
    )
    reshard_after_forward: bool | None = None
    activation_checkpointing: bool = False
    fsdp1_only: list[str] = Field(default_factory=list, exclude=True, description="FSDP1 knobs given: no effect")

    @model_validator(mode="before")
    @classmethod
    def _legacy_names(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out: dict = {"fsdp1_only": []}
        for key, value in data.items():
            name = key[len(_LEGACY_PREFIX) :] if key.startswith(_LEGACY_PREFIX) and key != "fsdp_version" else key
            if name == "version":
                name = "fsdp_version"
            if name == "cpu_offload":  # transformers' name for offload_params
                name = "offload_params"
            if name in _FSDP1_ONLY:
                out["fsdp1_only"].append(key)
                continue
            if isinstance(value, str) and name in ("sharding_strategy",) and value[:1].isdigit():
                value = {"1": "FULL_SHARD", "2": "SHARD_GRAD_OP"}.get(value[:1], value)  # accelerate's numbering
            out[name] = value
        return out

    @model_validator(mode="after")
    def _fsdp2_only(self) -> FsdpConfig:
        if self.fsdp_version != 2:
            raise ValueError(
                f"fsdp_version {self.fsdp_version} is not supported: FSDP1 is deprecated in transformers; "
                "set fsdp_version: 2 (same keys)"
            )
        if self.reshard_after_forward is not None and self.sharding_strategy is not None:
            if self.reshard_after_forward != (self.sharding_strategy == "FULL_SHARD"):
                raise ValueError(
                    f"sharding_strategy {self.sharding_strategy} and reshard_after_forward "
                    f"{self.reshard_after_forward} disagree; keep one of them"
                )
        return self

    @property
    def reshard(self) -> bool:
        if self.reshard_after_forward is not None:
            return self.reshard_after_forward
        return self.sharding_strategy != "SHARD_GRAD_OP"

    @property
    def layer_classes(self) -> list[str]:
        value = self.transformer_layer_cls_to_wrap
        if value is None:
            return []
        return [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)


def fsdp_of(config) -> FsdpConfig | None:
    """The run's FSDP settings, or None when it isn't FSDP-sharded."""
    legacy = config.fsdp
    if isinstance(legacy, str):
        legacy = legacy.split()
    if config.fsdp_config is None and not legacy:
        return None
    fsdp = config.fsdp_config or FsdpConfig()
    if isinstance(legacy, list):
        opts = {o.lower() for o in legacy}
        updates: dict = {}
        if "offload" in opts:
            updates["offload_params"] = True
        if "shard_grad_op" in opts and fsdp.reshard_after_forward is None and fsdp.sharding_strategy is None:
            updates["reshard_after_forward"] = False
        fsdp = fsdp.model_copy(update=updates)
    return fsdp


def kind_of(config) -> Literal["fsdp", "deepspeed"] | None:
    if config.deepspeed:
        return "deepspeed"
    return "fsdp" if fsdp_of(config) is not None else None


def check_keys(config) -> None:
    """Cross-field rules that need no machine (called by TrainConfig's validator); ValueError on a problem."""
    if config.fsdp is False:
        config.fsdp = None
    if isinstance(config.fsdp, list | str):
        opts = config.fsdp.split() if isinstance(config.fsdp, str) else config.fsdp
        unknown = [o for o in opts if o.lower() not in ("full_shard", "shard_grad_op", "auto_wrap", "offload")]
        if unknown:
            raise ValueError(f"fsdp: unknown option(s) {unknown}; use full_shard, shard_grad_op, auto_wrap, offload")
    if config.fsdp_version is not None:
        if config.fsdp_version != 2:
            raise ValueError(f"fsdp_version {config.fsdp_version} is not supported: set fsdp_version: 2 (FSDP2)")
        if config.fsdp_config is None and not config.fsdp:
            config.fsdp_config = FsdpConfig()
    if config.deepspeed and fsdp_of(config) is not None:
        raise ValueError("deepspeed and fsdp both set: a run is sharded by one of them; remove the other")
    if config.deepspeed and not _looks_like_path(config.deepspeed):
        deepspeed_file(config.deepspeed)  # a preset name: raises with the preset names when unknown


def _looks_like_path(value: str) -> bool:
    """A file is looked for where the run starts (beside its config), not where it is parsed."""
    return "/" in value or value.endswith(".json")


def deepspeed_presets() -> list[str]:
    return sorted(p.stem for p in DEEPSPEED_PRESETS_DIR.glob("*.json"))


def deepspeed_file(name_or_path: str, base_dir: Path | None = None) -> Path:
    """A preset by name (`zero3_bf16`, as axolotl's deepspeed_configs/ names them) or a JSON file."""
    stem = Path(name_or_path).name.removesuffix(".json")
    preset = DEEPSPEED_PRESETS_DIR / f"{stem}.json"
    path = Path(name_or_path).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if path.is_file():
        return path
    if preset.is_file() and (name_or_path == stem or "deepspeed_configs" in name_or_path):
        return preset  # axolotl's own `deepspeed: deepspeed_configs/zero3_bf16.json` lands here too
    raise ValueError(f"deepspeed: no preset or file {name_or_path!r}; presets: {', '.join(deepspeed_presets())}")


# -- the machine ----------------------------------------------------------------------------------


def device_count_problems(config, devices: int) -> list[tuple[str, str]]:
    """A sharded run needs 2 or more devices (processes): on one there is nothing to shard over."""
    kind = kind_of(config)
    if kind is None or devices >= 2:
        return []
    key = "deepspeed" if kind == "deepspeed" else "fsdp_config"
    return [
        (
            key,
            f"{kind} shards the model over several devices, but this run gets {devices}: ask for 2 or more "
            "GPUs for the run (gpus; trainyard train --processes), or remove the key to train on one device",
        )
    ]


def refuse_too_few_devices(config, devices: int) -> None:
    """The web app's check when a run is queued with its device count (ConfigInvalid, key paths)."""
    from training.config import ConfigError, ConfigInvalid

    problems = device_count_problems(config, devices)
    if problems:
        raise ConfigInvalid([ConfigError(key, reason) for key, reason in problems])


def environment_problems(config, *, devices: int | None, cuda_available: bool) -> list[tuple[str, str]]:
    """(key, reason) for what this machine and this run's device count can't do. `devices` is how
    many processes the run gets (None: not known here, e.g. a web host that is not the worker)."""
    kind = kind_of(config)
    if kind is None:
        return []
    problems = device_count_problems(config, devices) if devices is not None else []
    if kind == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            problems.append(
                ("deepspeed", "DeepSpeed is not installed (pip install 'trainyard[deepspeed]' on a CUDA machine)")
            )
        if not cuda_available:
            problems.append(("deepspeed", "DeepSpeed needs CUDA GPUs; on this machine use fsdp_config (FSDP2)"))
    if kind == "fsdp" and config.load_in_4bit and not cuda_available:
        problems.append(
            (
                "fsdp_config",
                "QLoRA with FSDP2 shards 4-bit bitsandbytes weights, which needs CUDA; on the CPU use adapter: lora",
            )
        )
    if kind == "fsdp" and config.load_in_4bit and config.bf16 is False:
        problems.append(
            (
                "bf16",
                "QLoRA with FSDP2 stores the 4-bit weights as bf16 so they shard like the rest; "
                "leave bf16 unset (auto) or true",
            )
        )
    return problems


# -- what the Trainer and the launcher get --------------------------------------------------------


def qlora_quantization_kwargs(config, dtype) -> dict:
    """Extra BitsAndBytesConfig arguments for QLoRA under FSDP2, as bitsandbytes' FSDP-QLoRA guide and
    axolotl do it: the packed 4-bit weights are stored in the model's dtype (bf16), so FSDP flattens
    and shards them like every other parameter. For training/modeling.py's load_model (its owner
    wires it in: `BitsAndBytesConfig(..., **sharding.qlora_quantization_kwargs(config, dtype))`);
    empty when the run is not QLoRA + FSDP2."""
    if not (config.load_in_4bit and kind_of(config) == "fsdp"):
        return {}
    return {"bnb_4bit_quant_storage": dtype}


def keep_int8_weights_through_fsdp2(model) -> int:
    """Let FSDP2 shard bitsandbytes' 8-bit weights (`load_in_8bit` with fsdp_config). Returns the layers prepared.

    FSDP2 (torch 2.13) rebuilds every parameter as a plain tensor when it shards or gathers it, so an 8-bit
    layer's Int8Params lose the per-row scales (SCB) bitsandbytes 0.50 multiplies them by, and the first forward
    fails; bitsandbytes has no FSDP2 all-gather hooks for them. Here (as axolotl does, with smaller patches) the
    shard stays plain int8, the scales stay whole on every rank (one float per output row), and the gathered
    weight is an Int8Params again, over the very storage FSDP2 gathers into and frees after the layer: the int8
    weights are sharded, the loss is the unsharded run's (tests/unit/test_sharding.py). The scales are also a
    buffer of the layer, so the state dicts of checkpoints and of the final save name only what the layer holds.
    """
    import bitsandbytes as bnb
    import torch

    _patch_fsdp_param_for_int8()
    layers = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, bnb.nn.Linear8bitLt) and isinstance(weight, bnb.nn.Int8Params) and weight.SCB is not None:
            module.register_buffer("SCB", weight.SCB)
            module.weight_format = torch.tensor(0, dtype=torch.uint8)  # bitsandbytes saves this key too: row-major
            layers += 1
    return layers


def _patch_fsdp_param_for_int8() -> None:
    """FSDPParam keeps an Int8Params' scales when it shards it and makes the gathered weight an Int8Params."""
    import bitsandbytes as bnb
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    if getattr(FSDPParam, "_trainyard_int8", False):
        return
    init_sharded, init_unsharded = FSDPParam._init_sharded_param, FSDPParam.init_unsharded_param

    def _init_sharded_param(self, param, *args, **kwargs):
        scales = param.SCB if isinstance(param, bnb.nn.Int8Params) else None
        init_sharded(self, param, *args, **kwargs)
        if scales is not None:
            self.trainyard_int8_scales = scales

    def init_unsharded_param(self):
        init_unsharded(self)
        scales = getattr(self, "trainyard_int8_scales", None)
        if scales is not None and not isinstance(self._unsharded_param, bnb.nn.Int8Params):
            # Made once: later all-gathers refill the same storage, which the layer's state.CB also views.
            data = self._unsharded_param.data
            self._unsharded_param = bnb.nn.Int8Params(
                data, requires_grad=False, has_fp16_weights=False, CB=data, SCB=scales
            )

    FSDPParam._init_sharded_param = _init_sharded_param
    FSDPParam.init_unsharded_param = init_unsharded_param
    FSDPParam._trainyard_int8 = True


def trainer_kwargs(config, base_dir: Path | None = None) -> dict:
    """TrainingArguments' fsdp / fsdp_config / deepspeed for this run (empty when not sharded)."""
    if config.deepspeed:
        return {"deepspeed": str(deepspeed_file(config.deepspeed, base_dir))}
    fsdp = fsdp_of(config)
    if fsdp is None:
        return {}
    options: dict = {
        "version": 2,
        "cpu_offload": fsdp.offload_params,
        "cpu_ram_efficient_loading": fsdp.cpu_ram_efficient_loading,
        "auto_wrap_policy": fsdp.auto_wrap_policy,
        "state_dict_type": fsdp.state_dict_type,
        "reshard_after_forward": fsdp.reshard,
        "activation_checkpointing": fsdp.activation_checkpointing,
    }
    if fsdp.layer_classes:
        options["transformer_layer_cls_to_wrap"] = fsdp.layer_classes
    if fsdp.auto_wrap_policy == "SIZE_BASED_WRAP":
        options["min_num_params"] = fsdp.min_num_params
    kwargs: dict = {"fsdp": True, "fsdp_config": options}
    import torch

    if not torch.cuda.is_available():  # the CPU proof (gloo): see _let_accelerate_shard_on_the_cpu
        _let_accelerate_shard_on_the_cpu()
        kwargs["use_cpu"] = True
    return kwargs


def _let_accelerate_shard_on_the_cpu() -> None:
    """accelerate turns on FSDP only for accelerator devices (MULTI_GPU and kin); torch's FSDP2 itself
    runs on the CPU over gloo. Several CPU processes with an FSDP plugin are made FSDP here, so the
    same Trainer path that runs on GPUs can be proven on a CPU box. Idempotent; nothing changes on CUDA."""
    from accelerate import state as accelerate_state
    from accelerate.utils import DistributedType

    cls = accelerate_state.AcceleratorState
    if getattr(cls.__init__, "_trainyard_cpu_fsdp", False):
        return
    original = cls.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            accelerate_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._trainyard_cpu_fsdp = True
    cls.__init__ = __init__


def accelerate_config(
    config, num_processes: int, *, cpu: bool, mixed_precision: str = "no", machines: int = 1, machine_rank: int = 0
) -> dict:
    """The `accelerate launch --config_file` contents for this run (`num_processes` over all machines)."""
    out: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "num_machines": machines,
        "machine_rank": machine_rank,
        "num_processes": num_processes,
        "mixed_precision": mixed_precision,
        "use_cpu": cpu,
        "rdzv_backend": "static",  # every member knows its machine rank: no elastic membership
        "same_network": True,
        "main_training_function": "main",
        "debug": False,
    }
    kind = kind_of(config)
    if kind == "deepspeed":
        out["distributed_type"] = "DEEPSPEED"
        # With a DeepSpeed JSON, precision is the JSON's (bf16 "auto" follows the Trainer): accelerate
        # refuses a config file that also sets mixed_precision.
        del out["mixed_precision"]
        out["deepspeed_config"] = {
            "deepspeed_config_file": str(deepspeed_file(config.deepspeed)),
            "zero3_init_flag": False,
        }
    elif kind == "fsdp":
        fsdp = fsdp_of(config)
        out["distributed_type"] = "FSDP"
        out["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_offload_params": fsdp.offload_params,
            "fsdp_cpu_ram_efficient_loading": fsdp.cpu_ram_efficient_loading,
            "fsdp_auto_wrap_policy": fsdp.auto_wrap_policy,
            "fsdp_state_dict_type": fsdp.state_dict_type,
            "fsdp_reshard_after_forward": fsdp.reshard,
            "fsdp_activation_checkpointing": fsdp.activation_checkpointing,
            **({"fsdp_transformer_layer_cls_to_wrap": ",".join(fsdp.layer_classes)} if fsdp.layer_classes else {}),
        }
    else:
        out["distributed_type"] = "MULTI_CPU" if cpu else "MULTI_GPU"
    return out


def write_accelerate_config(config, path: Path, num_processes: int, *, cpu: bool, **machines) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(accelerate_config(config, num_processes, cpu=cpu, **machines), sort_keys=False))
    return path


def launch_prefix(accelerate_config_file: Path, num_processes: int, port: int, *, cpu: bool = False) -> list[str]:
    """`python -m accelerate.commands.launch ...` arguments that precede `-m training train ...`.
    `cpu` stays False for the CPU proof too: accelerate's --cpu starts a single process (it expects
    MPI to start the others); without it torchrun starts them and the trainer picks gloo."""
    args = ["-m", "accelerate.commands.launch", "--config_file", str(accelerate_config_file)]
    args += ["--num_processes", str(num_processes), "--main_process_port", str(port)]
    return args + (["--cpu"] if cpu else [])


def multi_process_launch(
    config,
    run_dir: Path,
    num_processes: int,
    port: int,
    *,
    machines: int = 1,
    machine_rank: int = 0,
    main_ip: str | None = None,
) -> list[str]:
    """The launcher arguments for a run on `num_processes` devices (over all `machines`; the same
    number on each): the accelerate config is written into the run folder (kept with the run, so
    what ran can be read later). Several machines: every member runs this with its `machine_rank`
    and the leader's `main_ip`:`port` (docs/multi-host.md). `config` None (unreadable here): plain
    data parallel; the trainer reports the config's problem."""
    if config is None:
        return ["-m", "accelerate.commands.launch", "--num_processes", str(num_processes)] + [
            "--main_process_port",
            str(port),
        ]
    if machines > 1 and (num_processes % machines or main_ip is None):
        raise ValueError(f"{num_processes} processes on {machines} machines: need the same count on each and main_ip")
    name = "accelerate.yaml" if machines == 1 else f"accelerate-machine{machine_rank}.yaml"
    path = write_accelerate_config(
        config, Path(run_dir) / name, num_processes, cpu=False, machines=machines, machine_rank=machine_rank
    )
    args = launch_prefix(path, num_processes, port)
    if machines > 1:
        args += ["--num_machines", str(machines), "--machine_rank", str(machine_rank), "--main_process_ip", main_ip]
    return args


def die_with_launcher() -> None:
    """In a rank started by torchrun (accelerate launch): get SIGKILL when the launcher dies. torch's
    elastic agent starts every rank in a session of its own, so the worker's kill of the launcher's
    process group (cancel) reaches the ranks only through the agent, and a launcher killed outright
    (worker gone: PR_SET_PDEATHSIG) would leave the ranks running on their devices. Linux only."""
    import ctypes
    import os
    import signal

    if world_size() < 2:
        return
    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent:  # the launcher died before we asked
        os.kill(os.getpid(), signal.SIGKILL)


def world_size() -> int:
    """How many processes this training run has (accelerate / torchrun set WORLD_SIZE)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1") or 1)


# -- what each rank holds -------------------------------------------------------------------------


def rank_share(model) -> dict:
    """This rank's part of the model: parameters it stores (an FSDP2 DTensor counts its local shard)
    out of all parameters, and its peak memory."""
    import resource

    import torch

    local = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_numel"):  # DeepSpeed ZeRO-3: the full size and this rank's partition
            total += p.ds_numel
            local += p.ds_tensor.numel() if getattr(p, "ds_tensor", None) is not None else p.ds_numel
            continue
        to_local = getattr(p, "to_local", None)  # FSDP2: a DTensor; its local shard is what this rank holds
        local += to_local().numel() if to_local is not None else p.numel()
        total += p.numel()
    memory = (
        torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"local_params": local, "total_params": total, "memory_mb": round(memory, 1)}


def memory_of_every_rank(own_mb: float) -> dict:
    """{"memory_mb_rank0": ..., "memory_mb_rank1": ...} from every rank (a collective: all ranks call
    it at the same step); {} in a single process, where memory_mb says it all."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return {}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, round(own_mb, 1))
    return {f"memory_mb_rank{i}": mb for i, mb in enumerate(everyone)}


def gather_rank_shares(model) -> list[dict]:
    """rank_share of every rank, on every rank ([own] when not distributed)."""
    import torch.distributed as dist

    mine = rank_share(model)
    if not (dist.is_available() and dist.is_initialized()):
        return [{"rank": 0, **mine}]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return [{"rank": i, **share} for i, share in enumerate(everyone)]

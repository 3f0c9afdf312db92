"""Playground generation: the same prompt through the base model and through base + adapter."""

from __future__ import annotations

from pathlib import Path

from training.modeling import MODEL_LOCK


def generate_pair(base_model: str, adapter_dir: Path, prompt: str, max_new_tokens: int = 64) -> tuple[str, str]:
    """(base answer, fine-tuned answer), greedy, with the tokenizer's chat template when it has one. One model
    at a time in a process: loading one patches process-wide state (see MODEL_LOCK), and so can generating while
    another thread loads (torch's default dtype)."""
    with MODEL_LOCK:
        return _generate_pair(base_model, adapter_dir, prompt, max_new_tokens)


def _generate_pair(base_model: str, adapter_dir: Path, prompt: str, max_new_tokens: int) -> tuple[str, str]:
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from training.architectures import auto_model_class  # the class the trainer loaded (adapter module names)

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(  # tokenizer.json and its chat template, even beside a tekken.json
        adapter_dir if (adapter_dir / "tokenizer.json").exists() else base_model, mistral_format=False
    )
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
    base = auto_model_class(base_model).from_pretrained(base_model)
    model = PeftModel.from_pretrained(base, adapter_dir) if (adapter_dir / "adapter_config.json").exists() else None
    settings = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
        "use_cache": True,
    }  # no packing here, so the cache is safe

    def run(m) -> str:
        with torch.no_grad():
            out = m.generate(**inputs, **settings)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    if model is None:  # a full fine-tune: the folder is the tuned model
        tuned = auto_model_class(adapter_dir).from_pretrained(adapter_dir)
        return run(base), run(tuned)
    with model.disable_adapter():
        base_text = run(model)
    return base_text, run(model)

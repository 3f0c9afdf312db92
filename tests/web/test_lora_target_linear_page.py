"""The config page says what `lora_target_linear` adapts: on a vision-language model the language model only,
with the regex PEFT is given."""

from __future__ import annotations

import html
import re

import pytest

from tests.helpers import GOOD

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def qwen_vl(data_dir):
    """The tiny Qwen3.5 vision-language model, as a folder in the server's model directory."""
    from training.architectures import build_tiny

    return build_tiny("qwen3_5", data_dir / "models" / "tiny-qwen3_5").name


def _lora_box(page: str) -> str:
    assert 'id="lora-target-linear"' in page
    return html.unescape(page.split('id="lora-target-linear"')[1].split("</div>")[0])


def test_the_config_page_shows_the_language_model_regex_of_lora_target_linear(alice_client, alice_dataset, qwen_vl):
    text = GOOD.format(steps=5).replace("base_model: tiny-chat", f"base_model: {qwen_vl}")
    page = alice_client.post("/configs/new/", {"name": "c", "yaml": text, "action": "validate"}).content.decode()
    assert "The config is valid." in page
    box = _lora_box(page)
    assert "the language model's linear layers only; the vision tower is not adapted" in box
    regex = re.search(r'<code class="regex">(.*?)</code>', box).group(1)
    assert re.fullmatch(regex, "model.language_model.layers.0.mlp.up_proj")
    assert re.fullmatch(regex, "model.language_model.layers.1.self_attn.q_proj")
    assert not re.fullmatch(regex, "model.visual.blocks.0.attn.qkv") and not re.fullmatch(regex, "lm_head")
    # a regex of the user's own is kept beside it: how a user asks for vision layers too
    own = "lora_target_linear: true\nlora_target_modules: 'model\\.visual\\..*qkv'"
    mine = text.replace("lora_target_linear: true", own)
    page = alice_client.post("/configs/new/", {"name": "c", "yaml": mine, "action": "validate"}).content.decode()
    box = _lora_box(page)
    regex = re.search(r'<code class="regex">(.*?)</code>', box).group(1)
    assert re.fullmatch(regex, "model.visual.blocks.0.attn.qkv") and "except the layers your" in box


def test_a_text_model_adapts_every_linear_layer_and_the_saved_page_says_so(alice_client, alice_dataset):
    text = GOOD.format(steps=5)
    page = alice_client.post("/configs/new/", {"name": "c", "yaml": text, "action": "save"}, follow=True)
    box = _lora_box(page.content.decode())
    assert "every linear layer of the model but its output layer" in box and "regex" not in box
    no_adapter = text.replace("adapter: lora\n", "")
    page = alice_client.post("/configs/new/", {"name": "d", "yaml": no_adapter, "action": "validate"}).content.decode()
    assert 'id="lora-target-linear"' not in page

"""The config page and API show the contract's refusals at their key paths, one per key."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.helpers import GOOD
from webapp.workspaces.services import create_api_token

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def api(alice):
    _, raw = create_api_token(alice[0], alice[1], "test")
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}")


def test_refused_axolotl_keys_are_listed_at_their_paths(api, alice_dataset, settings):
    yaml_text = GOOD.format(steps=5) + (
        "plugins:\n  - axolotl.integrations.kernels.KernelsPlugin\n"
        "rl: dpo\nlora_qkv_kernel: true\nlora_mlp_kernel: false\nwandb_project: x\n"
    )
    answer = api.post("/api/configs/validate", {"yaml": yaml_text}, content_type="application/json")
    assert answer.status_code == 422
    paths = [e["path"] for e in answer.json()["errors"]]
    assert paths == ["plugins[0]", "rl", "lora_qkv_kernel"]
    assert all("\n" not in e["message"] and "; " in e["message"] for e in answer.json()["errors"])
    # Off values and harmless keys are accepted; a machine limit (Liger without CUDA) is said at its path.
    ok = GOOD.format(steps=5) + "lora_mlp_kernel: false\nwandb_project: x\nsaves_per_epoch: 1\n"
    assert api.post("/api/configs/validate", {"yaml": ok}, content_type="application/json").json()["valid"]
    # The machine is checked here on one host; scaled out (Redis), each worker checks its own at start.
    settings.REDIS_URL = ""
    liger = GOOD.format(steps=5) + "plugins:\n  - axolotl.integrations.liger.LigerPlugin\nliger_rope: true\n"
    refused = api.post("/api/configs/validate", {"yaml": liger}, content_type="application/json").json()
    assert [e["path"] for e in refused["errors"]] == ["plugins[0]", "liger_rope"]
    assert "CUDA GPU" in refused["errors"][0]["message"]


def test_the_config_page_shows_what_a_valid_config_does_less_than_it_says(alice_client, alice_dataset):
    """Targets the model partly lacks: valid (the others are adapted), and the page says which are missing."""
    text = GOOD.format(steps=5).replace("lora_target_linear: true", "lora_target_modules: [q_proj, qkv_proj]")
    page = alice_client.post("/configs/new/", {"name": "c", "yaml": text, "action": "validate"}).content.decode()
    assert "The config is valid." in page
    warnings = page.split('id="config-warnings"')[1].split("</div>")[0]
    assert "qkv_proj match no module of this model, so only q_proj get LoRA" in warnings

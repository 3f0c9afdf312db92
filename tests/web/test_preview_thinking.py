"""The preview of a row with a reasoning trace: its tokens are trained with the turn and marked apart."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.helpers import jsonl

pytestmark = pytest.mark.django_db

THINKING_ROW = {
    "messages": [
        {"role": "user", "content": "What is 3 times 4?"},
        {"role": "assistant", "content": "It is 12.", "reasoning_content": "Multiply three by four."},
    ]
}


def test_a_qwen3_rows_thinking_tokens_are_shown_apart_and_trained(alice_client, alice, tiny_model_dir):
    from webapp.datasets.services import upload_dataset
    from webapp.runs.models import TrainingConfig

    user, workspace = alice
    upload = SimpleUploadedFile("thinking.jsonl", jsonl([THINKING_ROW]))
    dataset = upload_dataset(workspace, user, upload, name="thinking").dataset
    config = TrainingConfig.objects.create(
        workspace=workspace,
        name="qwen3",
        yaml="base_model: tiny-chat\nchat_template: qwen3\ndatasets:\n  - path: thinking\n",
    )
    page = alice_client.get(f"/datasets/{dataset.pk}/preview/?row=0&config={config.pk}").content.decode()
    assert 'class="tok trained thinking"' in page
    assert "assistant #1 thinking" in page

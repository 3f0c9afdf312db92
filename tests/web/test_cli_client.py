"""The `trainyard` command line against a live server: login, upload, create a run, watch, download."""

from __future__ import annotations

import json
import zipfile

import pytest

from tests.helpers import CHAT_ROW, GOOD
from training.cli import main
from webapp.workspaces.services import create_api_token

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_login_upload_create_watch_download(live_server, alice, tmp_path, monkeypatch, capsys, tiny_model_dir):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    _, token = create_api_token(alice[0], alice[1], "cli")
    assert main(["login", live_server.url, "--token", "ty_wrong"]) == 1
    assert main(["login", live_server.url, "--token", token]) == 0
    creds = tmp_path / "config" / "trainyard" / "credentials.json"
    assert json.loads(creds.read_text())["token"] == token and oct(creds.stat().st_mode)[-3:] == "600"

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(CHAT_ROW) + "\n{nope\n")
    assert main(["datasets", "upload", str(broken)]) == 1
    assert "line 2: invalid JSON" in capsys.readouterr().err

    from training.demo import chat_rows

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(60)))
    assert main(["datasets", "upload", str(data), "--name", "cli-chat"]) == 0
    dataset_id = int(capsys.readouterr().out.split()[1])

    config = tmp_path / "lora.yaml"
    config.write_text(GOOD.format(steps=4).replace("path: chat", "path: placeholder"))
    assert main(["runs", "create", str(config), "--dataset", str(dataset_id)]) == 0
    run_id = int(capsys.readouterr().out.split()[1])
    assert main(["runs", "watch", str(run_id), "--interval", "0.2"]) == 0
    assert f"run {run_id} succeeded" in capsys.readouterr().out
    assert main(["runs", "download", str(run_id), "--out", str(tmp_path / "out")]) == 0
    (zipped,) = (tmp_path / "out").glob("*.zip")
    assert "adapter/adapter_config.json" in zipfile.ZipFile(zipped).namelist()
    # Another workspace's run, or none: one line, no traceback.
    capsys.readouterr()
    assert main(["runs", "watch", "999999", "--interval", "0.2"]) == 1
    assert main(["runs", "download", "999999", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("error: HTTP 404") == 2 and "Traceback" not in err

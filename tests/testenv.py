"""Loaded by pytest before Django (`-p tests.testenv`): a private data dir and immediate huey for the session."""

import os
import tempfile

os.environ["TRAINYARD_DATA_DIR"] = tempfile.mkdtemp(prefix="trainyard-test-")
os.environ["TRAINYARD_HUEY_IMMEDIATE"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

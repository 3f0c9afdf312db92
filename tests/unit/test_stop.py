"""The graceful stop seam: a trainer asked to stop (`should_stop`, fed by the run's STOP file) ends
at the next step boundary, keeps its checkpoints and writes no final artifact."""

from __future__ import annotations

import pytest

from training.config import parse_config
from training.demo import write_datasets
from training.events import TERMINAL_STATES, ListEventSink, StopRequested
from training.train import train


def test_the_terminal_states_are_the_ones_a_trainer_ends_with():
    assert TERMINAL_STATES == {"succeeded", "failed", "cancelled"}


@pytest.mark.slow
def test_a_stop_request_ends_training_at_the_next_step_without_a_final_artifact(tiny_model_dir, tmp_path):
    data = write_datasets(tmp_path / "data", rows_per_file=200)[0].parent
    config = parse_config(
        {
            "base_model": str(tiny_model_dir),
            "datasets": [{"path": str(data / "chat.jsonl"), "type": "chat_template"}],
            "sequence_len": 128,
            "micro_batch_size": 4,
            "max_steps": 200,
            "save_steps": 2,
            "adapter": "lora",
            "lora_target_linear": True,
        }
    )
    sink = ListEventSink()

    def stop_after_three_steps() -> bool:
        return sum(e["event"] == "metric" and "loss" in e["values"] for e in sink.events) >= 3

    with pytest.raises(StopRequested, match=r"at step \d+") as stopped:
        train(config, tmp_path / "run", sink, should_stop=stop_after_three_steps)
    assert int(str(stopped.value).rsplit(" ", 1)[-1]) in (3, 4)  # the step it was asked at, or the next
    assert not (tmp_path / "run" / "adapter").exists()
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()

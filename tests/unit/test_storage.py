"""Disk faults in words (training/storage.py): real kernel errors, and the ones libraries wrap."""

from __future__ import annotations

import errno

import pytest

from training.storage import explain_os_error, folder_problem


def test_a_real_enospc_is_told_as_a_full_disk(tmp_path):
    with pytest.raises(OSError) as caught:
        with open("/dev/full", "w") as full:  # the kernel answers every write with ENOSPC
            full.write("x")
    assert caught.value.errno == errno.ENOSPC
    assert explain_os_error(caught.value, tmp_path).startswith("no space left on the disk of the run folder (")


def test_wrapped_errors_are_read_through_their_causes_and_text(tmp_path):
    wrapped = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert explain_os_error(wrapped, tmp_path).startswith("no space left")
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "checkpoints" / "checkpoint-2"))
        except OSError as exc:
            raise ValueError("saving failed") from exc
    except ValueError as outer:
        said = explain_os_error(outer, tmp_path)
    assert said == "run folder not writable (permission denied) writing checkpoints/checkpoint-2"
    assert explain_os_error(OSError(errno.EROFS, "Read-only file system"), tmp_path).startswith(
        "run folder not writable (read-only file system)"
    )
    assert explain_os_error(ValueError("shapes do not match"), tmp_path) is None


def test_a_folder_is_checked_by_writing_in_it(tmp_path):
    assert folder_problem(tmp_path) is None
    not_a_folder = tmp_path / "runs"
    not_a_folder.write_text("a file where the run folder should be")
    assert folder_problem(not_a_folder).startswith("run folder not writable (not a directory)")
    assert folder_problem(tmp_path, min_free_mb=10**12).startswith("no space left on the data dir (")

"""A run's files: checkpoints, the downloadable zips of its adapter / model / merged model, and
what the playground loads. Rows in `Artifact`; no status changes here."""

from __future__ import annotations

import uuid
import zipfile
from pathlib import Path

from django.http import FileResponse, Http404

from webapp.runs.models import Artifact, Run


def zip_folder(folder: Path, target: Path, arcname: str) -> Path:
    """Zip a folder next to itself (written aside, then renamed: never a half zip)."""
    tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.part")  # two zips at once never collide
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, Path(arcname) / path.relative_to(folder))
    tmp.replace(target)
    return target


def package_artifacts(run: Run, kinds=("adapter", "model", "merged")) -> list[Artifact]:
    """Zip the adapter (or full model, or merged model) folder with its tokenizer, for download."""
    made = []
    for kind in kinds:
        folder = run.run_dir / kind
        if folder.is_dir():
            target = zip_folder(folder, run.run_dir / f"{kind}.zip", kind)
            # Once per kind: a reaper may package again what a dying worker had begun to.
            artifact, _ = Artifact.objects.update_or_create(
                run=run, kind=kind, defaults={"path": target.name, "size": target.stat().st_size}
            )
            made.append(artifact)
    return made


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def record_checkpoint(run: Run, path: str) -> None:
    """A checkpoint the trainer saved (its `artifact` event); once per path however often it is read."""
    Artifact.objects.get_or_create(
        run=run, kind="checkpoint", path=path, defaults={"size": folder_size(run.run_dir / path)}
    )


def latest_checkpoint(run: Run) -> Path | None:
    """The newest *complete* checkpoint: a process killed while saving leaves a folder without
    trainer_state.json (written last), which can't be resumed from."""
    folder = run.run_dir / "checkpoints"
    found = [
        p
        for p in (folder.glob("checkpoint-*") if folder.is_dir() else [])
        if p.name.split("-")[-1].isdigit() and _complete(p)
    ]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _complete(checkpoint: Path) -> bool:
    return (checkpoint / "trainer_state.json").exists()


def resumable_checkpoint(run: Run) -> Path | None:
    """Where a new attempt of `run` starts: its own newest complete checkpoint, else the checkpoint this attempt
    itself started from (an attempt killed before its first save has nothing newer, and its steps since are
    lost either way). None when neither is there."""
    checkpoint = latest_checkpoint(run)
    if checkpoint is None and run.resume_checkpoint and _complete(Path(run.resume_checkpoint)):
        checkpoint = Path(run.resume_checkpoint)
    return checkpoint


class NothingToTry(ValueError):
    pass


def playground_source(run: Run) -> Path:
    """What the playground loads: the final adapter (or model), else the latest checkpoint (an attempt's own,
    else the one it started from)."""
    for name in ("adapter", "model"):
        if (run.run_dir / name).is_dir():
            return run.run_dir / name
    checkpoint = resumable_checkpoint(run)
    if checkpoint is None:
        raise NothingToTry("nothing to try yet: no adapter and no checkpoint (set save_steps to try during training)")
    return checkpoint


def download(run: Run, artifact: Artifact) -> FileResponse:
    """The artifact as a download (shared by the page and the API); folders are zipped once."""
    path = (run.run_dir / artifact.path).resolve()
    if not path.is_relative_to(run.run_dir.resolve()) or not path.exists():
        raise Http404("artifact file missing")
    if path.is_dir():  # a checkpoint: zipped on first download, then served from disk
        target = path.with_name(path.name + ".zip")
        path = target if target.exists() else zip_folder(path, target, path.name)
    return FileResponse(path.open("rb"), as_attachment=True, filename=f"run-{run.pk}-{path.name}")

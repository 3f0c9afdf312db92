"""Build the offline demo (tiny model, sample datasets) and a demo user in a demo workspace."""

from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.core.management.base import BaseCommand

from training.demo import build_demo_model, write_datasets
from webapp.datasets.intake import UploadRejected
from webapp.datasets.services import upload_dataset
from webapp.runs.models import TrainingConfig
from webapp.runs.presets import PRESETS
from webapp.workspaces.services import create_user_with_workspace

DEMO_USER, DEMO_PASSWORD, DEMO_WORKSPACE = "demo", "trainyard", "Demo"


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser):
        parser.add_argument("--username", default=DEMO_USER)
        parser.add_argument("--password", default=DEMO_PASSWORD)
        parser.add_argument("--no-datasets", action="store_true", help="don't upload the sample datasets")

    def handle(self, *args, **opts):
        model_dir = settings.TRAINYARD_MODEL_DIRS[0] / "tiny-chat"
        build_demo_model(model_dir)
        self.stdout.write(f"demo model: {model_dir}")
        user, workspace = create_user_with_workspace(opts["username"], opts["password"], DEMO_WORKSPACE)
        if opts["no_datasets"]:
            return
        for path in write_datasets(settings.DATA_DIR / "demo-data"):
            with Path(path).open("rb") as f:
                try:
                    result = upload_dataset(workspace, user, File(f, name=path.name), name=f"demo-{path.stem}")
                except UploadRejected as exc:  # the generator and the validator disagree: say so loudly
                    raise SystemExit(f"demo dataset {path} failed validation: {exc}") from None
            self.stdout.write(f"dataset: {result.dataset.name} ({result.dataset.rows} rows)")
        TrainingConfig.objects.get_or_create(
            workspace=workspace,
            name="demo-lora",
            defaults={
                "yaml": PRESETS["lora-small"][1].format(model="tiny-chat", dataset="demo-chat", type="chat_template"),
                "created_by": user,
            },
        )

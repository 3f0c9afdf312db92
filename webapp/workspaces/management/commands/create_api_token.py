"""Create an API token for a user in a workspace and print it (it is stored hashed, shown once)."""

from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.core.management.base import BaseCommand, CommandError

from webapp.workspaces.models import Workspace
from webapp.workspaces.services import create_api_token


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--workspace", required=True)
        parser.add_argument("--name", default="cli")

    def handle(self, *args, username, workspace, name, **opts):
        user = get_user_model().objects.filter(username=username).first()
        space = Workspace.objects.filter(name=workspace).first()
        if user is None or space is None:
            raise CommandError(f"no user {username!r}" if user is None else f"no workspace {workspace!r}")
        try:
            _, raw = create_api_token(user, space, name)
        except PermissionDenied as exc:
            raise CommandError(f"{username} is not a member of {workspace}") from exc
        self.stdout.write(raw)

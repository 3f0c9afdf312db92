"""The REST API: one NinjaAPI mounting one router per resource. Session (with CSRF) or bearer-token auth."""

from django.core.exceptions import PermissionDenied
from ninja import NinjaAPI
from ninja.security import HttpBearer, django_auth

from webapp.api import configs, datasets, runs
from webapp.workspaces.services import token_owner


class BearerToken(HttpBearer):
    """`Authorization: Bearer ty_...`: the token's user, in the token's workspace."""

    def authenticate(self, request, token):
        found = token_owner(token)
        if found is None:
            return None
        request.user = found.user
        request.api_workspace = found.workspace
        return found


api = NinjaAPI(title="Trainyard API", version="0.1", auth=[BearerToken(), django_auth])


@api.exception_handler(PermissionDenied)
def _forbidden(request, exc):
    return api.create_response(request, {"message": str(exc) or "forbidden"}, status=403)


api.add_router("/configs", configs.router)
api.add_router("/datasets", datasets.router)
api.add_router("/runs", runs.router)

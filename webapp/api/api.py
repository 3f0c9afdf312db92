"""The REST API: one NinjaAPI mounting one router per resource. Session (with CSRF) or bearer-token auth."""

from django.core.exceptions import PermissionDenied
from django.http import Http404
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError
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


class TrainyardAPI(NinjaAPI):
    """The schema lists the refusals every route can give besides its own answers, in our error shape:
    401 (no session or token), 403 (a viewer writing), 404 (not in your workspaces), 422 (a request
    that doesn't match the schema) and 400 (a body that isn't JSON)."""

    def get_openapi_schema(self, *args, **kwargs):
        schema = super().get_openapi_schema(*args, **kwargs)
        schema["components"].setdefault("schemas", {})["Error"] = {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "errors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"path": {"type": "string"}, "message": {"type": "string"}},
                    },
                },
            },
            "required": ["message"],
        }
        error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                codes = {401: "not signed in", 422: "the request doesn't match the schema"}
                if method != "get":
                    codes[403] = "viewers of the workspace can't change anything"
                if "{" in path or method == "post":  # an object, or one named in the body, must be yours
                    codes[404] = "not found (or not in your workspace)"
                if "requestBody" in operation:
                    codes[400] = "the body can't be parsed"
                responses = operation.setdefault("responses", {})
                for code, description in codes.items():
                    responses.setdefault(code, {"description": description, **error})
        return schema


api = TrainyardAPI(title="Trainyard API", version="0.1", auth=[BearerToken(), django_auth])


# Every error is {"message": ...}; a request that doesn't match the schema also says where.
@api.exception_handler(PermissionDenied)
def _forbidden(request, exc):
    return api.create_response(request, {"message": str(exc) or "forbidden"}, status=403)


@api.exception_handler(Http404)
def _not_found(request, exc):
    return api.create_response(request, {"message": "not found (or not in your workspace)"}, status=404)


@api.exception_handler(AuthenticationError)
def _unauthorized(request, exc):
    message = "sign in, or send Authorization: Bearer <token> (create one under Settings → API tokens)"
    return api.create_response(request, {"message": message}, status=401)


@api.exception_handler(HttpError)
def _http_error(request, exc):
    # ninja's own refusals (e.g. "Cannot parse request body") in our shape, not {"detail": ...}
    return api.create_response(request, {"message": exc.message}, status=exc.status_code)


@api.exception_handler(ValidationError)
def _invalid(request, exc):
    errors = []
    for error in exc.errors:
        loc = [str(part) for part in error.get("loc", ())]
        if len(loc) > 1 and loc[0] == loc[1]:  # ninja repeats the parameter source ("body", "body", ...)
            loc = loc[1:]
        errors.append({"path": ".".join(loc), "message": error.get("msg", "invalid")})
    summary = "; ".join(f"{e['path']}: {e['message']}" for e in errors[:3]) or "invalid request"
    return api.create_response(request, {"message": summary, "errors": errors}, status=422)


api.add_router("/configs", configs.router)
api.add_router("/datasets", datasets.router)
api.add_router("/runs", runs.router)

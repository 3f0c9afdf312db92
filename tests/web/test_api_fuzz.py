"""schemathesis against /api/openapi.json with an authenticated token: no request gets a 5xx, and
every status code answered is one the schema lists for that route."""

from __future__ import annotations

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck, assume, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import status_code_conformance

from webapp.workspaces.services import create_api_token, create_user_with_workspace
from webapp.wsgi import application

schema = schemathesis.openapi.from_wsgi("/api/openapi.json", application)


@pytest.fixture
def token(db):
    # As Django's test client does: the real WSGI handler would close the test's database connection.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield _make_token()
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


def _make_token():
    user, workspace = create_user_with_workspace("fuzzer", "fuzz-password", "Fuzz team")
    return create_api_token(user, workspace, "fuzz")[1]


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_answers_5xx(case, token):
    response = case.call(headers={"Authorization": f"Bearer {token}"})
    assert response.status_code < 500, (case.method, case.formatted_path, response.status_code)
    case.validate_response(response, checks=[status_code_conformance])


# The routes that take free-form input (a config's YAML, an uploaded file), generated within the schema only.
accepting = schemathesis.openapi.from_wsgi("/api/openapi.json", application).include(
    method="POST", path=["/api/configs/", "/api/configs/validate", "/api/datasets/"]
)
accepting.config.generation.update(modes=[GenerationMode.POSITIVE])


def _business_refusal(case, response) -> bool:
    """A refusal of what the request says, not of its shape: a config that isn't a valid one (422 with
    "invalid config" and the keys at fault), an upload refused for its file (rows, size, packaging) or its
    name's characters (400 naming that field): no schema can say those. An option the schema could have
    listed (an unknown format) is not one of them."""
    body = response.json()
    if case.path.startswith("/api/configs"):
        return response.status_code == 422 and body.get("message") == "invalid config" and "errors" in body
    return response.status_code == 400 and body.get("field") in ("file", "name")


@accepting.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_a_request_the_schema_allows_is_never_refused_for_its_shape(case, token):
    assert case.meta.generation.mode.is_positive
    if case.path == "/api/datasets/":
        # Werkzeug (schemathesis' WSGI client) writes an empty file part with no blank line before the
        # next boundary, where Django's parser sees no file at all; a real client's empty file is told
        # "no rows in the file" (test_datasets.py::test_the_api_tells_an_empty_file_it_has_no_rows).
        file = case.body.get("file")
        assume(getattr(file, "data", file) != b"")
    response = case.call(headers={"Authorization": f"Bearer {token}"})
    assert 200 <= response.status_code < 300 or _business_refusal(case, response), (
        case.method,
        case.formatted_path,
        response.status_code,
        response.text[:300],
    )

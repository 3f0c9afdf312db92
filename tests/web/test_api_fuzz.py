"""schemathesis against /api/openapi.json with an authenticated token: no request gets a 5xx, and
every status code answered is one the schema lists for that route."""

from __future__ import annotations

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
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

"""The REST API: one NinjaAPI mounting one router per resource. Session or bearer-token auth (tokens: later)."""

from ninja import NinjaAPI
from ninja.security import django_auth

from webapp.api import datasets, runs

api = NinjaAPI(title="Trainyard API", version="0.1", auth=django_auth)  # django_auth checks CSRF on unsafe methods
api.add_router("/datasets", datasets.router)
api.add_router("/runs", runs.router)

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path

from webapp.api.api import api
from webapp.datasets import views as datasets
from webapp.runs import config_views as configs
from webapp.runs import views as runs
from webapp.workspaces import members
from webapp.workspaces import views as workspaces

urlpatterns = [
    path("", runs.home, name="home"),
    path("login/", workspaces.RateLimitedLoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("workspaces/switch/", workspaces.switch, name="workspace-switch"),
    path("workspaces/new/", workspaces.workspace_new, name="workspace-new"),
    path("settings/tokens/", workspaces.tokens, name="tokens"),
    path("settings/members/", members.members, name="members"),
    path("datasets/", datasets.dataset_list, name="dataset-list"),
    path("datasets/import/", datasets.hub_import, name="dataset-hub-import"),
    path("datasets/imports/<int:import_id>/", datasets.hub_import_detail, name="dataset-import"),
    path("datasets/imports/<int:import_id>/status.json", datasets.hub_import_status, name="dataset-import-status"),
    path("datasets/<int:pk>/", datasets.dataset_detail, name="dataset-detail"),
    path("datasets/<int:pk>/preview/", datasets.dataset_preview, name="dataset-preview"),
    path("datasets/<int:pk>/stats.json", datasets.dataset_stats, name="dataset-stats"),
    path("datasets/<int:pk>/rejected/", datasets.dataset_rejected, name="dataset-rejected"),
    path("datasets/<int:pk>/delete/", datasets.dataset_delete, name="dataset-delete"),
    path("configs/<int:pk>/delete/", runs.delete_view, {"kind": "configs"}, name="config-delete"),
    path("runs/<int:pk>/delete/", runs.delete_view, {"kind": "runs"}, name="run-delete"),
    path("configs/", configs.config_list, name="config-list"),
    path("configs/new/", configs.config_edit, name="config-new"),
    path("configs/<int:pk>/", configs.config_edit, name="config-edit"),
    path("configs/<int:pk>/run/", configs.config_run, name="config-run"),
    path("configs/<int:pk>/export.yaml", configs.config_export, name="config-export"),
    path("runs/", runs.run_list, name="run-list"),
    path("runs/compare/", runs.run_compare, name="run-compare"),
    path("runs/<int:pk>/", runs.run_detail, name="run-detail"),
    path("runs/<int:pk>/cancel/", runs.run_cancel, name="run-cancel"),
    path("runs/<int:pk>/resume/", runs.run_resume, name="run-resume"),
    path("runs/<int:pk>/notes/", runs.run_note, name="run-note"),
    path("runs/<int:pk>/merge/", runs.run_merge, name="run-merge"),
    path("runs/<int:pk>/playground/", runs.run_playground, name="run-playground"),
    path("runs/<int:pk>/playground/<int:generation_id>/", runs.run_generation, name="run-generation"),
    path("runs/<int:pk>/log.txt", runs.run_log, name="run-log"),
    path("runs/<int:pk>/artifacts/<int:artifact_id>/download/", runs.artifact_download, name="artifact-download"),
    path("api/", api.urls),
    # The admin signs in through the rate-limited login page, never its own unlimited form.
    path("admin/login/", workspaces.admin_login, name="admin-login"),
    path("admin/", admin.site.urls),
]

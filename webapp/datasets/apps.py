from django.apps import AppConfig


class DatasetsConfig(AppConfig):
    name = "webapp.datasets"
    default_auto_field = "django.db.models.BigAutoField"

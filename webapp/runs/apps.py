from django.apps import AppConfig


class RunsConfig(AppConfig):
    name = "webapp.runs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        # The worker's start-up hooks (heavy imports once, a warm trainer): registered with huey in every
        # process, called only by a worker's consumer.
        from webapp.runs import warm  # noqa: F401

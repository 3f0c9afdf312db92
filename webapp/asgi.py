"""ASGI entry: HTTP through Django, websockets through channels (authenticated by session)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

django_asgi = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from webapp.runs.routing import websocket_urlpatterns  # noqa: E402
from webapp.runs.warm import warm_web_process  # noqa: E402
from webapp.upload_limit import UploadSizeLimit  # noqa: E402

warm_web_process()  # torch imported in the background: the first "Start run" doesn't wait for it

application = ProtocolTypeRouter(
    {
        "http": UploadSizeLimit(django_asgi),
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)

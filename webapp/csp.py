"""A strict Content-Security-Policy on every response: scripts only from this server's own files.

Pages keep their scripts in `static/js/` and pass state with `json_script` and `data-` attributes,
so no inline script or handler is needed and an injected one cannot run. Styles may be inline:
plotly sets them on every chart element.
"""

from django.utils.deprecation import MiddlewareMixin

POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "connect-src 'self'",  # includes this host's ws:// and wss:// (the live run page)
        "worker-src 'self' blob:",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


class ContentSecurityPolicyMiddleware(MiddlewareMixin):
    def process_response(self, request, response):
        response.headers.setdefault("Content-Security-Policy", POLICY)
        return response

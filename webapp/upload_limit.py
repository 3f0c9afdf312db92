"""Refuse an upload over the size limit from its Content-Length, before any byte of it is read.

Django's ASGI handler reads a request's whole body (spooling it to a temporary file) before a view
runs, so a view can only refuse an oversized upload after it has filled the disk. This ASGI wrapper
answers 413 first: a page for the upload form, JSON for the API.
"""

from __future__ import annotations

import html
import json

from asgiref.sync import sync_to_async

UPLOAD_PATHS = {"/datasets/", "/api/datasets/"}
MULTIPART_SLACK = 64 * 1024  # form fields and boundaries around the file


def _limit() -> int:
    from webapp.datasets.intake import upload_limit

    return upload_limit()


class UploadSizeLimit:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in UPLOAD_PATHS:
            headers = dict(scope.get("headers") or [])
            try:
                length = int(headers.get(b"content-length", b"0"))
            except ValueError:
                length = 0
            limit = await sync_to_async(_limit)()
            if length > limit + MULTIPART_SLACK:
                message = f"the file is about {length:,} bytes, over this server's {limit:,}-byte upload limit"
                await _refuse(send, scope["path"], message)
                return
        await self.app(scope, receive, send)


async def _refuse(send, path: str, message: str) -> None:
    if path.startswith("/api/"):
        body, kind = json.dumps({"message": message}).encode(), b"application/json"
    else:
        body = (
            "<!doctype html><title>Upload too large · Trainyard</title>"
            f"<main style='font-family:sans-serif;max-width:40em;margin:3em auto'><h1>Upload refused</h1>"
            f"<p>{html.escape(message)}.</p><p>Split the file, gzip it, or ask an admin to raise the limit.</p>"
            "<p><a href='/datasets/'>Back to datasets</a></p></main>"
        ).encode()
        kind = b"text/html; charset=utf-8"
    headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})

"""The page at `GET /` for browsers: plain HTML, CSS and JS from webapp/static/, nothing from elsewhere.

`GET /` answers the page to a client that prefers HTML (a browser's Accept header) and the JSON
endpoint list to everyone else (curl's `*/*`, API clients, no Accept at all): `wants_html` decides,
`routes_health.index` asks it. The page's Content-Security-Policy allows this origin only, so it
works offline and nothing can load a script from anywhere else.
"""
from __future__ import annotations

from flask import current_app, request, send_from_directory

PAGE_FILE = "index.html"
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")


def wants_html() -> bool:
    """True when the client ranks text/html above JSON (browsers do; `*/*` and no Accept mean JSON)."""
    return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"


def page_response():
    resp = send_from_directory(current_app.static_folder, PAGE_FILE, mimetype="text/html", max_age=0)
    resp.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Vary"] = "Accept"
    return resp

"""Optional API key: `Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in constant time.

The check runs before a view reads the body, so an unauthenticated upload is refused without
being parsed. `/health`, `/` and the page's files under `/static/` stay open so load balancers and
people can see the service; the page asks for the key when an endpoint answers 401.
"""
from __future__ import annotations

import hmac

from flask import Flask, request

from webapp.errors import ApiError

OPEN_PATHS = frozenset({"/health", "/"})
OPEN_PREFIXES = ("/static/",)


def presented_key() -> str:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("X-API-Key", "").strip()


def install_api_key_check(app: Flask, api_key: str) -> None:
    if not api_key:
        return
    expected = api_key.encode()

    @app.before_request
    def _require_api_key():
        if request.path in OPEN_PATHS or request.path.startswith(OPEN_PREFIXES):
            return None
        given = presented_key().encode()
        if not given or not hmac.compare_digest(given, expected):
            raise ApiError("unauthorized", headers={"WWW-Authenticate": 'Bearer realm="acestep"'})
        return None

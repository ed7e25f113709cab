"""Optional API key: `Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in constant time.

The check runs before a view reads the body, so an unauthenticated upload is refused without
being parsed. `/health` and `/` stay open so load balancers and people can see the service.
"""
from __future__ import annotations

import hmac

from flask import Flask, request

from webapp.errors import ApiError

OPEN_PATHS = frozenset({"/health", "/"})


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
        if request.path in OPEN_PATHS:
            return None
        given = presented_key().encode()
        if not given or not hmac.compare_digest(given, expected):
            raise ApiError("unauthorized", headers={"WWW-Authenticate": 'Bearer realm="acestep"'})
        return None

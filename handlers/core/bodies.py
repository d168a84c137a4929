"""A request's body as the server handed it (decoded JSON, bytes or text, or form fields) ->
a JSON object or raw bytes, with a 400 that says how to send it when it is neither."""
from __future__ import annotations

import json
from typing import Any

from handlers.core.errors import RequestError


class FormFields(dict):
    """A body the server decoded as form fields (curl -d without a Content-Type)."""


def request_body(value: Any) -> dict | bytes:
    """A JSON object (dict) or raw bytes; RequestError for empty bodies, form data and JSON that
    is not an object."""
    if isinstance(value, FormFields):
        raise RequestError(
            "body",
            "request arrived as form data; send JSON with 'Content-Type: application/json' "
            "(curl: -H 'Content-Type: application/json') or raw image bytes",
        )
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        value = value.encode("utf-8")
    if value is None or (isinstance(value, (bytes, bytearray)) and not value):
        raise RequestError("body", "empty request body")
    if not isinstance(value, (bytes, bytearray)):  # JSON the server decoded to a non-object
        raise RequestError("body", f"JSON body must be an object, got {type(value).__name__}")
    if bytes(value[:64]).lstrip()[:1] in (b"{", b"["):
        try:
            decoded = json.loads(bytes(value).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError("body", f"body is not valid JSON: {exc}") from None
        if not isinstance(decoded, dict):
            raise RequestError("body", f"JSON body must be an object, got {type(decoded).__name__}")
        return decoded
    return bytes(value)


def json_body(value: Any) -> dict:
    """Like request_body, for models that take JSON only."""
    body = request_body(value)
    if not isinstance(body, dict):
        raise RequestError("body", "body must be a JSON object with 'Content-Type: application/json'")
    return body

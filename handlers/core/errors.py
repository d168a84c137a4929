"""The one exception a handler raises for bad input, and how it becomes that request's HTTP status:
an error for that request only (`{"error", "field"}`), while the other requests of the same
TorchServe batch go on."""
from __future__ import annotations


class RequestError(Exception):
    """A problem with one request; becomes an HTTP error for that request only."""

    def __init__(self, field: str | None, message: str, status: int = 400):
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status

    def body(self) -> dict:
        return {"error": self.message, "field": self.field}


def set_error_status(context, idx: int, error: RequestError) -> None:
    """The HTTP status and reason phrase of request idx's error (TorchServe's per-request status)."""
    phrase = {400: "Bad Request", 503: "Service Unavailable"}.get(error.status, "Internal Server Error")
    context.set_response_status(error.status, phrase, idx)

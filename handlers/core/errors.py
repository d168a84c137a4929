"""The one exception a model raises for bad input: an error for that request only
(`{"error", "field"}` with its HTTP status), while the other requests of the same batch go on."""
from __future__ import annotations

REASONS = {400: "Bad Request", 404: "Not Found", 409: "Conflict", 499: "Cancelled", 503: "Service Unavailable"}


class RequestError(Exception):
    """A problem with one request; becomes an HTTP error for that request only."""

    def __init__(self, field: str | None, message: str, status: int = 400, extra: dict | None = None):
        """`extra`: more members of the error body (a cancelled request's `stopped_at_step`)."""
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status
        self.extra = extra or {}

    def body(self) -> dict:
        return {"error": self.message, "field": self.field, **self.extra}

    @property
    def reason(self) -> str:
        """The HTTP reason phrase of this error's status."""
        return REASONS.get(self.status, "Internal Server Error")


def internal_error(exc: Exception) -> RequestError:
    """An unexpected failure, reported as a 500 for the requests it touched."""
    return RequestError(None, f"internal error: {type(exc).__name__}: {exc}", status=500)

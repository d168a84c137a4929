"""The one exception a handler raises for bad input: it becomes an HTTP error for that request
only (`{"error", "field"}`), while the other requests of the same TorchServe batch go on."""
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

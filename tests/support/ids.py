"""Request ids for the in-process tests of ids, status and cancel (tests/unit/test_request_ids.py,
tests/unit/test_jobs.py)."""
from __future__ import annotations

import uuid

from handlers.core.jobs import Jobs


def fresh_id() -> str:
    """A valid request id no other test uses."""
    return f"test-{uuid.uuid4().hex[:16]}"


def jobs_of(handler) -> Jobs:
    """The request-id state of an in-process handler's server instance (handlers/core/jobs.py)."""
    return handler.static_loop.server.jobs

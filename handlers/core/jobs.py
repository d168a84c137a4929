"""Generation requests in flight, by request id, seen by every worker of a server instance.

TorchServe gives a worker no view of its siblings or of the frontend's queue, so the ids live in
the file system: one file per id in flight, named by the id and holding the worker's pid, in
`<temp dir>/torchserve-jobs/<model>/running/`. The temp dir is the worker's (`TMPDIR`, which
TorchServe passes on from its own environment), so the workers of one server instance share it; a
server started with its own `TMPDIR` keeps its ids apart from other instances on the host
(docs/rest-api.md, "Request ids"). A file whose pid is no longer alive (a worker that died
mid-request) does not hold its id.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from handlers.core.errors import RequestError


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class Jobs:
    """The ids in flight of one model on this server instance."""

    def __init__(self, model_name: str, root: str | None = None):
        self.running = Path(root or tempfile.gettempdir()) / "torchserve-jobs" / model_name / "running"
        self.running.mkdir(parents=True, exist_ok=True)

    def claim(self, request_id: str) -> None:
        """Marks `request_id` in flight; RequestError (409, field request_id) when a live worker
        already runs a request with that id. The file appears whole (written aside, then linked:
        a link fails if the name exists), so no reader sees it without its pid."""
        path = self.running / request_id
        aside = self.running / f".{request_id}.{os.getpid()}"
        aside.write_text(str(os.getpid()))
        try:
            for _ in range(2):
                try:
                    os.link(aside, path)
                    return
                except FileExistsError:
                    if self.holder(request_id) is not None:
                        raise RequestError("request_id", f"a request with request_id {request_id!r} is already "
                                                         "in flight; ids must be unique while a request runs",
                                           409) from None
                    path.unlink(missing_ok=True)  # left by a worker that died: not held
            raise RequestError("request_id", f"request_id {request_id!r} is being claimed by another request", 409)
        finally:
            aside.unlink(missing_ok=True)

    def holder(self, request_id: str) -> int | None:
        """The pid of the live worker running `request_id`, or None."""
        try:
            pid = int((self.running / request_id).read_text() or 0)
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid and alive(pid) else None

    def release(self, request_id: str) -> None:
        (self.running / request_id).unlink(missing_ok=True)

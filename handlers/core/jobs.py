"""Generation requests by request id, seen by every worker of a server instance: which are in
flight, how far each has got, and which were asked to stop.

TorchServe gives a worker no view of its siblings or of the frontend's queue, so this state lives
in the file system, under `<temp dir>/torchserve-jobs/<model>/`:

    running/<id>         the pid of the worker running the request (a claim: the id is taken)
    status/<id>.json     its state: running (step k of n, ETA), finished, cancelled or failed;
                         an ended one is kept `job_status_keep_s` (the model's yaml)
    cancelled/<id>       a cancel (written by the `jobs` archive, handlers/jobs/): the time until
                         which a request with that id is refused (`cancel_wait_s`, its yaml)

The temp dir is the worker's (`TMPDIR`, which TorchServe passes on from its own environment), so
the workers of one server instance share it; a server started with its own `TMPDIR` keeps its ids
apart from other instances on the host (docs/jobs.md). A claim whose pid is no longer alive (a
worker that died mid-request) does not hold its id.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

from handlers.core.errors import RequestError
from handlers.core.streaming import eta_s

CANCELLED = 499  # the HTTP mapping of google.rpc.Code.CANCELLED (nginx's "client closed request")
STATUS_EVERY_S = 0.5  # a running request's status file is rewritten at most this often
ENDED = ("finished", "cancelled", "failed")  # the states a request ends in
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # what TorchServe accepts as a model name


def jobs_root(root: str | None = None) -> Path:
    return Path(root or tempfile.gettempdir()) / "torchserve-jobs"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a part."""
    aside = path.with_name(f".{path.name}.{os.getpid()}")
    aside.write_text(text)
    os.replace(aside, path)


def cancelled_error(request_id: str, step: int = 0, total: int | None = None) -> RequestError:
    """The answer of a cancelled request: 499, and after which of its steps it stopped (0: it never ran)."""
    where = f"after step {step} of {total}" if total else "before it started"
    extra = {"cancelled": True, "stopped_at_step": step, **({"total": total} if total else {}), "request_id": request_id}
    return RequestError("request_id", f"request {request_id!r} was cancelled {where}", CANCELLED, extra=extra)


class Jobs:
    """The requests of one model on this server instance, by id."""

    def __init__(self, model_name: str, root: str | None = None, status_keep_s: float = 300.0):
        base = jobs_root(root) / model_name
        self.running, self.status_dir, self.cancels = base / "running", base / "status", base / "cancelled"
        for d in (self.running, self.status_dir, self.cancels):
            d.mkdir(parents=True, exist_ok=True)
        self.status_keep_s = status_keep_s
        self._written: dict[str, float] = {}
        self._pruned = 0.0

    # claims -----------------------------------------------------------------------------------
    def claim(self, request_id: str) -> None:
        """Marks `request_id` in flight; RequestError 409 (field request_id) when a live worker
        already runs a request with that id, 499 when the id was cancelled before it arrived. The
        file appears whole (written aside, then linked: a link fails if the name exists), so no
        reader sees it without its pid."""
        if self.cancel_requested(request_id):
            raise cancelled_error(request_id)
        path = self.running / request_id
        aside = self.running / f".{request_id}.{os.getpid()}"
        aside.write_text(str(os.getpid()))
        try:
            for _ in range(2):
                try:
                    os.link(aside, path)
                    self._written.pop(request_id, None)
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
        self._written.pop(request_id, None)

    # cancels ----------------------------------------------------------------------------------
    def cancel_requested(self, request_id: str) -> bool:
        """Whether a cancel for `request_id` stands (an expired one is removed)."""
        path = self.cancels / request_id
        try:
            until = float(path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return False
        if until < time.time():
            path.unlink(missing_ok=True)
            return False
        return True

    def request_cancel(self, request_id: str, wait_s: float) -> None:
        write_atomic(self.cancels / request_id, repr(time.time() + wait_s))

    # status -----------------------------------------------------------------------------------
    def report(self, request_id: str, step: int, total: int, elapsed_s: float) -> None:
        """A running request's progress (`elapsed_s` since its steps began; its ETA follows), written
        at most every STATUS_EVERY_S (and at step 0)."""
        now = time.monotonic()
        if step and now - self._written.get(request_id, -STATUS_EVERY_S) < STATUS_EVERY_S:
            return
        self._written[request_id] = now
        eta = eta_s(elapsed_s, step, total)
        self._write(request_id, {"state": "running", "step": step, "total": total, "elapsed_s": round(elapsed_s, 3),
                                 "eta_s": None if eta is None else round(eta, 3), "pid": os.getpid()})

    def end(self, request_id: str, state: str, **details) -> None:
        """A request's last state (one of ENDED), kept `status_keep_s`."""
        self._write(request_id, {"state": state, **details, "keep_until": time.time() + self.status_keep_s})
        self.prune()

    def _write(self, request_id: str, record: dict) -> None:
        write_atomic(self.status_dir / f"{request_id}.json", json.dumps({"request_id": request_id, **record,
                                                                          "updated": time.time()}))

    def status(self, request_id: str) -> dict | None:
        """The request's last recorded state, or None when nothing is known of it. A record that
        says running while no live worker holds the id belongs to a worker that died."""
        try:
            record = json.loads((self.status_dir / f"{request_id}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        if record.get("keep_until", float("inf")) < time.time():
            return None
        if record["state"] == "running" and self.holder(request_id) is None:
            record["state"] = "failed"
            record["error"] = "its worker stopped while it ran"
        return record

    def prune(self, every_s: float = 60.0) -> None:
        """Removes ended records past their time (at most once per `every_s`)."""
        now = time.time()
        if now - self._pruned < every_s:
            return
        self._pruned = now
        for path in self.status_dir.glob("*.json"):
            try:
                if json.loads(path.read_text()).get("keep_until", now) < now:
                    path.unlink(missing_ok=True)
            except (OSError, ValueError):
                continue

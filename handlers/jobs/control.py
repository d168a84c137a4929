"""The `jobs` archive's requests: cancel or ask about a ddpm / sd15 request by its `request_id`.

A cancel cannot travel through the model it is for: TorchServe queues it behind the very
generation it is meant to stop. So it goes to this archive's own worker, which acts on the state
every generation worker of the server instance keeps by request id (handlers/core/jobs.py): it
writes the cancel there, and the worker running that request stops after its current step.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from handlers.core.errors import RequestError
from handlers.core.jobs import ENDED, MODEL_NAME, Jobs, jobs_root
from handlers.core.request import RequestModel, checked_request_id


class JobsRequest(RequestModel):
    """`{"action": "cancel" | "status", "model": "sd15", "request_id": "..."}`"""

    action: Literal["cancel", "status"]
    """`cancel`: stop the request (running: after its current step; not arrived yet: refused when
    it arrives within `cancel_wait_s`); `status`: where it is."""
    model: Annotated[str, Field(max_length=128)]
    """The model the request was sent to (its request ids are its own)."""
    request_id: str
    """The id in the request's body (or its stream events)."""

    @field_validator("request_id")
    @classmethod
    def _check_request_id(cls, value: str) -> str:
        return checked_request_id(value)


class JobControl:
    """Cancel and status by request id for the generation models of this server instance."""

    def __init__(self, cancel_wait_s: float, root: str | None = None):
        self.cancel_wait_s = cancel_wait_s
        self.root = jobs_root(root)

    def tracked(self) -> list[str]:
        """The models whose workers keep their request ids here (a loaded ddpm or sd15 makes its own)."""
        return sorted(p.name for p in self.root.glob("*") if (p / "running").is_dir()) if self.root.is_dir() else []

    def jobs(self, model: str) -> Jobs:
        if not MODEL_NAME.fullmatch(model) or model not in self.tracked():
            known = ", ".join(self.tracked()) or "none"
            raise RequestError("model", f"no model named {model!r} keeps request ids on this server "
                                        f"(models with ids here: {known})", 404)
        return Jobs(model, str(self.root.parent))

    def answer(self, req: JobsRequest) -> dict:
        jobs = self.jobs(req.model)
        return self.cancel(jobs, req) if req.action == "cancel" else self.status(jobs, req)

    def cancel(self, jobs: Jobs, req: JobsRequest) -> dict:
        head = {"request_id": req.request_id, "model": req.model}
        record = jobs.status(req.request_id)
        if record is not None and record["state"] in ENDED:
            return {**head, "state": record["state"], "cancelled": False,
                    "message": f"the request has already ended ({record['state']}); nothing was touched"}
        jobs.request_cancel(req.request_id, self.cancel_wait_s)
        pid = jobs.holder(req.request_id)
        if pid is not None:
            return {**head, "state": "cancelling", "cancelled": True, "worker_pid": pid,
                    "message": "running: it stops after its current step and is answered 499"}
        return {**head, "state": "not running", "cancelled": True,
                "message": f"not running; will be refused if it arrives within {self.cancel_wait_s:g} s "
                           "(requests still queued in TorchServe are not visible to workers)"}

    def status(self, jobs: Jobs, req: JobsRequest) -> dict:
        record = jobs.status(req.request_id)
        if record is None:
            if jobs.cancel_requested(req.request_id):
                return {"request_id": req.request_id, "model": req.model, "state": "not running",
                        "cancel_requested": True}
            raise RequestError("request_id", f"nothing is known of request {req.request_id!r} of {req.model!r}: it has "
                                             "not reached a worker yet (queued requests are not visible to workers), "
                                             "or it ended longer ago than job_status_keep_s", 404)
        record.pop("keep_until", None)
        return {**record, "model": req.model, "cancel_requested": jobs.cancel_requested(req.request_id)}

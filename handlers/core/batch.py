"""The units a loop works on: a request as the server received it (`Incoming`), one valid model
request of it (`Pending`), requests that share one forward pass (`Group`), and what each model
request ends with (`Outcome`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from handlers.core.budget import streaming
from handlers.core.errors import RequestError
from handlers.core.request import RequestModel

JSON_TYPE = "application/json"
PNG_TYPE = "image/png"
NDJSON_TYPE = "application/x-ndjson"

REST = "rest"  # /predictions, /explanations: the model's own JSON / PNG / NDJSON
GRPC = "grpc"  # gRPC Predictions / StreamPredictions: the model's own JSON, in ONE message
KSERVE_V1 = "kserve"  # {"instances": [...]} -> {"predictions": [...]}
KSERVE_V2 = "kservev2"  # Open Inference Protocol: {"inputs": [...]} -> {"outputs": [...]}
PROTOCOLS = (REST, GRPC, KSERVE_V1, KSERVE_V2)
OWN_ANSWER = (REST, GRPC)  # protocols answered with the model's own body (not a KServe envelope)


@dataclass
class Incoming:
    """One request of a server batch, in the server's terms but no server's types."""

    idx: int  # position in the batch
    body: Any  # decoded JSON (dict), bytes or text, None, or handlers.core.bodies.FormFields
    protocol: str = REST
    request_id: str | None = None  # the server's id; the step-level loop follows requests by it
    accept: str = ""  # the Accept header
    explain: bool = False  # sent to an explanations route
    binary_tensors: bool = False  # a KServe v2 body in the binary tensor extension's framing

    @property
    def wants_png(self) -> bool:
        return self.accept.split(";")[0].strip().lower() == PNG_TYPE


@dataclass
class Outcome:
    """What one model request ends with: a response or an error."""

    response: Any = None
    error: RequestError | None = None
    content_type: str = JSON_TYPE
    headers: dict = field(default_factory=dict)


@dataclass
class Pending:
    """One valid model request, with what its request asked for."""

    idx: int  # position among the model requests of the batch
    params: RequestModel
    png: bool = False  # answer the PNG itself (Accept: image/png, one image, not streamed)
    explain: bool = False  # sent to an explanations route
    origin: int = 0  # the Incoming.idx it came from
    admitted: float = 0.0  # time.monotonic() when the worker took it: its deadline_s counts from here

    def past_deadline(self, now: float) -> bool:
        deadline = getattr(self.params, "deadline_s", None)
        return deadline is not None and now - self.admitted >= deadline

    @property
    def streaming(self) -> bool:
        return streaming(self.params)


@dataclass
class Admitted:
    """One Incoming after admission: its model requests (KServe v1 may carry several), or the
    error that refused it whole, and what its protocol's answer needs."""

    incoming: Incoming
    members: list[tuple[str, int]] = field(default_factory=list)  # (label for errors, model request index)
    error: RequestError | None = None
    v2_id: str | None = None  # a v2 request's own id
    wanted_outputs: list[str] | None = None  # a v2 request's `outputs`


@dataclass
class Group:
    """Requests of one batch whose batched fields are equal: run as ONE forward pass.

    `shared` holds only the batched fields and properties (`RequestModel.shared()`), so a group
    function cannot read a per-request field from another request by mistake; per-request fields
    come per image through `per_image`. Each request has its own seeded torch.Generator, repeated
    for each of its images (diffusers accepts one generator per image).
    """

    shared: dict[str, Any]
    requests: list[Pending]
    # Pending.idx -> the step after which it was cancelled (handlers/core/jobs.py); the progress
    # callback fills it in and raises GroupCancelled once every request of the group is in it.
    cancelled: dict[int, int] = field(default_factory=dict)
    # Pending.idx -> the step after which its deadline_s stopped it: the model answers its x0
    # estimate of that step for it (ddpm: its rows leave the loop; sd15: the whole group stops).
    stopped: dict[int, int] = field(default_factory=dict)

    def per_image(self, name: str) -> list:
        return [getattr(p.params, name) for p in self.requests for _ in range(p.params.images_requested)]

    def generators(self) -> list[torch.Generator]:
        gens = []
        for p in self.requests:
            gen = torch.Generator(device="cpu").manual_seed(p.params.seed)
            gens += [gen] * p.params.images_requested  # a request's images draw from its own stream
        return gens

    def first_images(self) -> list[int]:
        """Index of each request's first image among the group's images."""
        starts, n = [], 0
        for p in self.requests:
            starts.append(n)
            n += p.params.images_requested
        return starts


class GroupCancelled(Exception):
    """Every request of a group was cancelled: its denoising loop stops where it is."""


def group_of(pending: Pending) -> Group:
    """A group of one request."""
    return Group(shared=pending.params.shared(), requests=[pending])

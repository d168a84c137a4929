"""Declared requests: each model's request is ONE pydantic model, and everything else reads it.

A request model declares, per field, its type, default, limits and one-line documentation (the
attribute docstring under the field), and whether it splits a batch (`Batched`): requests of one
TorchServe batch run together only when all their batched fields are equal. A limit that depends
on the archive's target is declared as `ConfigMax("<key>")` and filled from the model config's
`handler:` section by `bind()`; there is no fallback value in code, a missing key fails the load.

pydantic v2 is what FastAPI, BentoML, Ray Serve and LitServe declare requests with; it gives the
validation and the JSON Schema (`GET /models/<name>?customized=true`, docs/api/) from the same
declaration. `parse()` turns its errors into this project's 400 contract,
`{"error": "'steps' must be an integer in [1, 100], got 0", "field": "steps"}`.
"""
from __future__ import annotations

import json
import re
import secrets
import typing
from collections.abc import Mapping
from copy import copy
from typing import Annotated, Any, ClassVar

import annotated_types as at
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)

from handlers.core.errors import RequestError

MAX_SEED = 2**63 - 1
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")
REQUEST_ID_BYTES = 16  # a generated id: 128 random bits, 22 URL-safe characters



def checked_request_id(request_id: str) -> str:
    """A client's request id as given; RequestError naming `request_id` when it is not 8 to 64 of [A-Za-z0-9._-]."""
    if not REQUEST_ID.fullmatch(request_id):
        raise RequestError("request_id", "'request_id' must be 8 to 64 letters, digits, '.', '_' or '-', "
                                         f"got {_short(request_id)}")
    return request_id

class ConfigMax:
    """Field metadata: the field's maximum is the model config's `handler:` value of `key`."""

    def __init__(self, key: str):
        self.key = key


class Batched:
    """Field metadata: requests with different values of this field never share a forward pass."""


BATCHED = Batched()

# A base64 image in JSON (a `data:` URL is accepted); cam also takes the raw image as the body.
Base64Image = Annotated[
    str | bytes,
    WithJsonSchema({"type": "string", "contentEncoding": "base64",
                    "description": "an image (PNG, JPEG, WebP, ...) as base64; a data: URL is accepted"}),
]


class RequestModel(BaseModel):
    """Base of every model's request: strict JSON types, unknown fields refused."""

    # ser_json_bytes: an image sent as bytes (a form upload) is recorded as base64, as JSON sends it.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True,
                              ser_json_bytes="base64")

    # Derived properties (not fields) that split a batch too, e.g. sd15's `mode`.
    batched_properties: ClassVar[tuple[str, ...]] = ()
    # The limits a bound model was built with (bind()).
    limits: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def bind(cls, limits: Mapping[str, Any]) -> type[RequestModel]:
        """This request type with every `ConfigMax` replaced by the archive's value. A default
        above its bound maximum becomes that maximum (cam's topk 5 on a 3-class model: 3)."""
        fields = {}
        for name, info in cls.model_fields.items():
            marks = [m for m in info.metadata if isinstance(m, ConfigMax)]
            if not marks:
                continue
            key = marks[0].key
            if key not in limits:
                raise KeyError(f"model config lacks handler.{key} (the maximum of the request field '{name}')")
            bound = copy(info)
            bound.metadata = [m for m in info.metadata if not isinstance(m, ConfigMax)] + [at.Le(limits[key])]
            if isinstance(info.default, (int, float)) and not isinstance(info.default, bool) \
                    and info.default > limits[key]:
                bound.default = type(info.default)(limits[key])
            fields[name] = (info.annotation, bound)
        bound_cls = create_model(cls.__name__, __base__=cls, __doc__=cls.__doc__, __module__=cls.__module__,
                                 **fields)
        bound_cls.limits = dict(limits)
        return bound_cls

    @classmethod
    def parse(cls, body: dict, context: Mapping[str, Any] | None = None) -> RequestModel:
        """Validates a JSON object; resolves every default; raises RequestError naming the field."""
        try:
            return cls.model_validate(body, context=dict(context or {}))
        except ValidationError as exc:
            raise cls._request_error(exc, body) from None

    # Batching ------------------------------------------------------------------------------
    @classmethod
    def batched_fields(cls) -> tuple[str, ...]:
        return tuple(n for n, info in cls.model_fields.items() if any(isinstance(m, Batched) for m in info.metadata))

    def batch_key(self) -> tuple:
        """Equal for requests that may run as one forward pass."""
        names = self.batched_fields() + self.batched_properties
        return tuple(getattr(self, n) for n in names)

    def shared(self) -> dict[str, Any]:
        """The values a group of requests shares: its batched fields and properties only."""
        names = self.batched_fields() + self.batched_properties
        return {n: getattr(self, n) for n in names}

    @property
    def images_requested(self) -> int:
        return int(getattr(self, "num_images", 1))

    # Time budget (models whose requests vary in cost override these) ------------------------
    def cost(self) -> float:
        """Work units of this request, in the unit of the target's speed figure."""
        return 0.0

    def cost_field(self) -> str:
        """The field to lower when the request is over the time budget."""
        return ""

    def cost_summary(self) -> str:
        return "this request"

    # Schema and errors -----------------------------------------------------------------------
    @classmethod
    def json_schema(cls) -> dict:
        schema = cls.model_json_schema()
        for name in cls.batched_fields():
            schema["properties"][name]["x-splits-batch"] = True
        return schema

    @classmethod
    def describe(cls, name: str) -> str:
        """'an integer in [1, 100]', "one of 'ddim', 'ddpm'", 'a string or null', ..."""
        info = cls.model_fields[name]
        kind, nullable = _unwrap(info.annotation)
        if typing.get_origin(kind) is typing.Literal:
            text = "one of " + ", ".join(repr(c) for c in typing.get_args(kind))
        elif typing.get_origin(kind) is Annotated or kind == (str | bytes):
            text = "a base64 image (string)"
        elif typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            text = "a list of objects with " + ", ".join(f"'{f}'" for f in item.model_fields)
        else:
            text = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]
            bounds = {type(m).__name__: m for m in info.metadata}
            low = bounds.get("Ge") or bounds.get("Gt")
            high = bounds.get("Le")
            low_v = None if low is None else getattr(low, "ge", getattr(low, "gt", None))
            if low is not None and high is not None:
                text += f" in {'(' if 'Gt' in bounds else '['}{_fmt(low_v)}, {_fmt(high.le)}]"
            elif low is not None:
                text += f" {'>' if 'Gt' in bounds else '>='} {_fmt(low_v)}"
            if "MultipleOf" in bounds:
                text += f", a multiple of {bounds['MultipleOf'].multiple_of}"
        return text + (" or null" if nullable else "")

    @classmethod
    def _request_error(cls, exc: ValidationError, body: dict) -> RequestError:
        errors = exc.errors()
        unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1)
        if unknown:
            return RequestError(unknown[0], f"unknown field '{unknown[0]}'; allowed fields: {', '.join(cls.model_fields)}")
        order = list(cls.model_fields)
        first = min(errors, key=lambda e: order.index(e["loc"][0]) if e["loc"] and e["loc"][0] in order else len(order))
        name = str(first["loc"][0]) if first["loc"] else None
        if name not in cls.model_fields:
            return RequestError(name, first["msg"])
        value = body.get(name)
        if len(first["loc"]) > 1 and value is not None:  # inside a list or object: say where
            where = name + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"][1:])
            return RequestError(name, f"'{name}' must be {cls.describe(name)}; {where}: {first['msg'][0].lower()}{first['msg'][1:]}")
        if first["type"] == "missing" or value is None:
            return RequestError(name, f"'{name}' is required: {cls.describe(name)}")
        if first["type"] == "multiple_of":
            return RequestError(name, f"'{name}' must be a multiple of {first['ctx']['multiple_of']}, got {_short(value)}")
        if first["type"].endswith("_type"):
            return RequestError(name, f"'{name}' must be {cls.describe(name)}, got {type(value).__name__} {_short(value)}")
        return RequestError(name, f"'{name}' must be {cls.describe(name)}, got {_short(value)}")


class SeededImages(RequestModel):
    """Requests that generate images: how many, and the seed that makes them reproducible."""

    num_images: Annotated[int, Field(ge=1), ConfigMax("max_num_images")] = 1
    """Images to generate."""
    seed: Annotated[int | None, Field(ge=0, le=MAX_SEED, validate_default=True)] = None
    """Seed of this request's own torch.Generator; null = a random one. The response reports the seed used."""

    stream: bool = False
    """Answer as NDJSON (`application/x-ndjson`), one event per line as the work goes: `progress` at
    every step, `preview` every `preview_every` steps, and last `result` holding exactly the
    non-streaming response (or `error`). See docs/streaming.md."""
    preview_every: Annotated[int, Field(ge=0)] = 5
    """With `stream`: a `preview` event (small PNGs of the current estimate) every this many steps; 0 = none."""
    request_id: Annotated[str | None, Field(validate_default=True)] = None
    """This request's id: 8 to 64 letters, digits, '.', '_' or '-'; null = a random, unguessable one.
    Returned in the body and in every stream event; a request whose id is already in flight is
    refused (409)."""
    deadline_s: Annotated[float | None, Field(gt=0)] = None
    """Seconds after a worker takes the request (time queued in TorchServe does not count) from which
    it stops after its current step and answers its best estimate so far: the decoded x0 prediction,
    with `stopped_at_step` in the response. At most the target's responseTimeout x timeout_margin;
    null = none. See docs/jobs.md#deadlines."""
    metadata: bool = True
    """Write how each PNG was made into it: AUTOMATIC1111's `parameters` text and the `serving` JSON
    record (docs/rest-api.md#images-that-say-how-they-were-made); false = bare PNGs."""

    @field_validator("seed")
    @classmethod
    def _resolve_seed(cls, seed: int | None) -> int:
        return secrets.randbelow(2**53) if seed is None else seed

    @field_validator("request_id")
    @classmethod
    def _resolve_request_id(cls, request_id: str | None) -> str:
        return secrets.token_urlsafe(REQUEST_ID_BYTES) if request_id is None else checked_request_id(request_id)

    @field_validator("deadline_s")
    @classmethod
    def _bound_deadline(cls, deadline: float | None, info: ValidationInfo) -> float | None:
        most = (info.context or {}).get("max_deadline_s")
        if deadline is not None and most is not None and deadline > most:
            raise RequestError("deadline_s", f"'deadline_s' must be at most {most:g} s (the target's responseTimeout x "
                                             f"timeout_margin), got {deadline:g}")
        return deadline

    @model_validator(mode="after")
    def _preview_needs_stream(self):
        if not self.stream:
            for name in self.stream_fields():
                if name in self.model_fields_set:
                    raise RequestError(name, f"'{name}' applies to streaming requests only; add \"stream\": true")
        return self

    @classmethod
    def stream_fields(cls) -> tuple[str, ...]:
        """Fields that only mean something with `stream`."""
        return ("preview_every",)

    def recorded(self) -> dict:
        """The request as resolved (defaults filled in, the seed used) as JSON values, less its id
        and the fields that only shape the stream: what the `serving` record of its PNGs holds."""
        return self.model_dump(mode="json", exclude={"stream", "request_id", *self.stream_fields()})

    def step_cost(self) -> float:
        """Work units between two messages of a streaming request: one step of its images, or the
        work done once per request (decoding), whichever is larger."""
        return self.num_images


def _unwrap(annotation) -> tuple[Any, bool]:
    """(inner type, nullable) of `X | None`."""
    args = typing.get_args(annotation)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None)), True
    return annotation, False


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _short(value: Any, limit: int = 40) -> str:
    text = f"<{len(value)} bytes>" if isinstance(value, (bytes, bytearray)) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

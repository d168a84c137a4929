"""What every handler shares: request parsing and validation, per-request errors inside a batch,
image decoding/encoding, seeds, device/dtype choice and the model config's `handler:` section.

All three handlers answer bad input the same way because they all go through this module:
HTTP 400 with `{"error": "...", "field": "..."}` for the bad request only, while the other
requests of the same TorchServe batch are answered normally.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)

# Truncated uploads must fail loudly instead of being padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

MAX_SEED = 2**63 - 1
JSON_TYPE = "application/json"
PNG_TYPE = "image/png"


class RequestError(Exception):
    """A problem with one request; becomes an HTTP error for that request only."""

    def __init__(self, field: str | None, message: str, status: int = 400):
        super().__init__(message)
        self.field = field
        self.message = message
        self.status = status

    def body(self) -> dict:
        return {"error": self.message, "field": self.field}


@dataclass(frozen=True)
class Param:
    """One documented request parameter: type, default and allowed values."""

    kind: type  # int, float, str, bool
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    choices: Sequence[str] | None = None
    nullable: bool = False
    # Strict lower bound: strength must lie in (0, 1], not [0, 1].
    exclusive_minimum: bool = False

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        name = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[self.kind]
        if self.minimum is not None and self.maximum is not None:
            left = "(" if self.exclusive_minimum else "["
            name += f" in {left}{_fmt(self.minimum)}, {_fmt(self.maximum)}]"
        elif self.minimum is not None:
            name += f" >= {_fmt(self.minimum)}"
        if self.nullable:
            name += " or null"
        return name


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def validate(name: str, value: Any, param: Param) -> Any:
    """Checks one value against its Param and returns it (ints are accepted for floats)."""
    if value is None:
        if param.nullable:
            return None
        raise RequestError(name, f"'{name}' is required: {param.describe()}")
    kind_ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[param.kind]
    if not kind_ok:
        raise RequestError(
            name, f"'{name}' must be {param.describe()}, got {type(value).__name__} {_short(value)}"
        )
    if param.kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise RequestError(name, f"'{name}' must be {param.describe()}, got {value}")
    if param.choices is not None and value not in param.choices:
        raise RequestError(name, f"'{name}' must be {param.describe()}, got {_short(value)}")
    too_low = param.minimum is not None and (
        value <= param.minimum if param.exclusive_minimum else value < param.minimum
    )
    too_high = param.maximum is not None and value > param.maximum
    if too_low or too_high:
        raise RequestError(name, f"'{name}' must be {param.describe()}, got {_short(value)}")
    return value


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else f"<{len(value)} bytes>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_params(body: dict, spec: dict[str, Param]) -> dict:
    """Validates a JSON object against a parameter spec; fills defaults; rejects unknown fields."""
    unknown = sorted(set(body) - set(spec))
    if unknown:
        raise RequestError(unknown[0], f"unknown field '{unknown[0]}'; allowed fields: {', '.join(spec)}")
    return {name: validate(name, body.get(name, param.default), param) for name, param in spec.items()}


def request_body(row: Any) -> dict | bytes:
    """One TorchServe request row -> a JSON object (dict) or raw bytes.

    TorchServe already json-decodes `application/json` bodies; anything else arrives as bytes.
    A JSON body sent as form data (curl -d without a Content-Type) arrives as form fields and
    gets a 400 that says how to send it.
    """
    if not isinstance(row, dict):
        row = {"body": row}
    if "body" in row or "data" in row:
        value = row.get("body", row.get("data"))
    elif not row:
        raise RequestError("body", "empty request body")
    else:
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
    if not isinstance(value, (bytes, bytearray)):  # JSON that TorchServe decoded to a non-object
        raise RequestError("body", f"JSON body must be an object, got {type(value).__name__}")
    stripped = bytes(value[:64]).lstrip()[:1]
    if stripped in (b"{", b"["):
        try:
            decoded = json.loads(bytes(value).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError("body", f"body is not valid JSON: {exc}") from None
        if not isinstance(decoded, dict):
            raise RequestError("body", f"JSON body must be an object, got {type(decoded).__name__}")
        return decoded
    return bytes(value)


def json_body(row: Any) -> dict:
    """Like request_body, for handlers that take JSON only."""
    body = request_body(row)
    if not isinstance(body, dict):
        raise RequestError("body", "body must be a JSON object with 'Content-Type: application/json'")
    return body


def decode_base64(value: str, name: str) -> bytes:
    if "," in value[:100] and value.startswith("data:"):
        value = value.split(",", 1)[1]  # accept data: URLs as browsers produce them
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(name, f"'{name}' is not valid base64") from None


def decode_image(data: bytes | str, name: str, max_pixels: int, mode: str = "RGB") -> Image.Image:
    """Bytes or base64 -> a fully decoded PIL image in `mode`.

    The pixel count is checked from the header before any pixel is decoded, so a decompression
    bomb costs nothing; truncated or undecodable data gives a 400 naming the field.
    """
    if isinstance(data, str):
        data = decode_base64(data, name)
    if not data:
        raise RequestError(name, f"'{name}' is empty")
    too_big = f"'{name}' has more pixels than the limit of {max_pixels}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise RequestError(name, f"{too_big} ({w}x{h} = {w * h})")
            img.load()
            return img.convert(mode)
    except RequestError:
        raise
    except Image.DecompressionBombError:
        raise RequestError(name, f"{too_big} (decompression bomb)") from None
    except UnidentifiedImageError:
        raise RequestError(name, f"'{name}' is not an image in a known format (PNG, JPEG, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RequestError(name, f"'{name}' is not a decodable image: {exc}") from None


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def b64_png(img: Image.Image) -> str:
    return base64.b64encode(encode_png(img)).decode("ascii")


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, C, H, W) floats in [0, 1] -> PIL images (L for 1 channel, RGB for 3)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in arr]
    return [Image.fromarray(a, mode="RGB") for a in arr]


def resolve_seed(seed: int | None) -> int:
    """The seed a request uses: its own, or a fresh random one (reported back either way)."""
    return secrets.randbelow(2**53) if seed is None else seed


SEED_PARAM = Param(int, None, minimum=0, maximum=MAX_SEED, nullable=True)


def group_by(items: Sequence[Any], key: Callable[[Any], Hashable]) -> dict[Hashable, list[int]]:
    """Indices of items grouped by key, groups in order of first appearance."""
    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return groups


def handler_config(context) -> dict:
    """The `handler:` section of the archive's model-config yaml ({} when absent)."""
    return dict((getattr(context, "model_yaml_config", None) or {}).get("handler") or {})


def select_device(context, config: dict) -> tuple[torch.device, torch.dtype]:
    """CUDA when TorchServe gave this worker a GPU, else CPU; dtype from the config.

    `dtype_gpu` (default float16) and `dtype_cpu` (default float32; bfloat16 allowed) in the
    `handler:` section; `threads` sets torch's intra-op threads on CPU.
    """
    gpu_id = context.system_properties.get("gpu_id")
    if torch.cuda.is_available() and gpu_id is not None:
        device = torch.device(f"cuda:{gpu_id}")
        dtype = getattr(torch, str(config.get("dtype_gpu", "float16")))
    else:
        device = torch.device("cpu")
        dtype = getattr(torch, str(config.get("dtype_cpu", "float32")))
        threads = int(config.get("threads", 0) or 0)
        if threads > 0:
            torch.set_num_threads(threads)
    return device, dtype


def timeout_budget(context, config: dict, rate_key: str) -> float:
    """Work units a batch may hold: the config's measured rate (units/s) x the model's
    responseTimeout x a safety margin (`timeout_margin`, default 0.7)."""
    timeout_s = float((getattr(context, "model_yaml_config", None) or {}).get("responseTimeout", 120))
    return float(config.get(rate_key, math.inf)) * timeout_s * float(config.get("timeout_margin", 0.7))


def model_dir(context) -> str:
    return context.system_properties["model_dir"]


def weights_dir(context) -> str:
    """Where archive.sh puts the model's weights inside the archive."""
    path = os.path.join(model_dir(context), "weights")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"weights directory missing from the archive: {path}")
    return path


def header(context, idx: int, name: str) -> str | None:
    """A request header, case-insensitively (TorchServe keeps the client's spelling)."""
    headers = context.get_all_request_header(idx) or {}
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name.lower() and isinstance(value, str):
            return value
    return None


def wants_png(context, idx: int) -> bool:
    accept = header(context, idx, "Accept") or ""
    return accept.split(";")[0].strip().lower() == PNG_TYPE


@dataclass
class Outcome:
    """What one request of a batch ends with: a response or an error."""

    response: Any = None
    error: RequestError | None = None
    content_type: str = JSON_TYPE
    headers: dict = field(default_factory=dict)


class BatchedHandler(BaseHandler):
    """preprocess -> inference -> postprocess over a TorchServe batch with per-request errors.

    Subclasses implement `parse(row, idx)` (raise RequestError for bad input), `group_key(req)`
    (requests with equal keys share one forward pass) and `run_group(reqs)` (returns one
    Outcome-compatible response per request). This class keeps the batch order, turns errors
    into 400s for their request only, and reports the batch size in an `X-Batch-Size` header.

    Time budget: a handler whose requests vary in cost sets `budget` (work units a batch may
    take on within TorchServe's responseTimeout, see `timeout_budget`) and `cost(req)`. A
    request that alone exceeds it is refused in parse (`check_cost`); requests that would push
    the batch past it get 503 (clients retry), so TorchServe never kills a worker for a slow batch.
    """

    budget: float = math.inf

    def prepare(self, context) -> str:
        """Keeps the context, reads the config's `handler:` section, picks device and dtype;
        returns the archive's weights directory. Every initialize() starts with it."""
        self.context = context
        self.config = handler_config(context)
        self.device, self.dtype = select_device(context, self.config)
        return weights_dir(context)

    def preprocess(self, data: list) -> list:
        parsed = []
        for idx, row in enumerate(data):
            try:
                parsed.append(self.parse(row, idx))
            except RequestError as err:
                parsed.append(err)
        return parsed

    def cost(self, req: Any) -> float:
        return 0.0

    def check_cost(self, req: Any, field: str, what: str) -> None:
        if self.cost(req) > self.budget:
            raise RequestError(field, f"{what} cannot finish within this server's response timeout "
                                      f"(at most {self.budget:.0f} work units per batch on this target; this "
                                      f"request needs {self.cost(req):.0f}); lower '{field}'")

    def inference(self, parsed: list, *args, **kwargs) -> list[Outcome]:
        spent = 0.0
        for i, req in enumerate(parsed):
            if not isinstance(req, RequestError):
                spent += self.cost(req)
                if spent > self.budget:
                    parsed[i] = RequestError(None, "server busy: this batch is at its time budget; retry", 503)
        outcomes = [Outcome(error=p) if isinstance(p, RequestError) else None for p in parsed]
        valid = [i for i, p in enumerate(parsed) if not isinstance(p, RequestError)]
        groups = group_by([parsed[i] for i in valid], self.group_key)
        for members in groups.values():
            idxs = [valid[m] for m in members]
            try:
                results = self.run_group([parsed[i] for i in idxs])
            except RequestError as err:
                results = [Outcome(error=err)] * len(idxs)
            except Exception as exc:  # noqa: BLE001 - one failing group must not fail the batch
                logger.exception("group of %d requests failed", len(idxs))
                err = RequestError(None, f"internal error: {type(exc).__name__}: {exc}", status=500)
                results = [Outcome(error=err)] * len(idxs)
            for i, res in zip(idxs, results):
                outcomes[i] = res if isinstance(res, Outcome) else Outcome(response=res)
        return outcomes

    def postprocess(self, outcomes: list[Outcome]) -> list:
        out = []
        for idx, oc in enumerate(outcomes):
            self.context.set_response_header(idx, "X-Batch-Size", str(len(outcomes)))
            for key, value in oc.headers.items():
                self.context.set_response_header(idx, key, value)
            if oc.error is not None:
                phrase = {400: "Bad Request", 503: "Service Unavailable"}.get(oc.error.status, "Internal Server Error")
                self.context.set_response_status(oc.error.status, phrase, idx)
                self.context.set_response_content_type(idx, JSON_TYPE)
                out.append(json.dumps(oc.error.body()))
            else:
                self.context.set_response_content_type(idx, oc.content_type)
                resp = oc.response
                out.append(resp if isinstance(resp, (bytes, bytearray)) else json.dumps(resp))
        return out

    def handle(self, data, context):
        start = time.time()
        self.context = context
        outputs = self.postprocess(self.inference(self.preprocess(data)))
        context.metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        return outputs

    # Subclass API ------------------------------------------------------------------------
    def parse(self, row: Any, idx: int) -> Any:
        raise NotImplementedError

    def group_key(self, req: Any) -> Hashable:
        raise NotImplementedError

    def run_group(self, reqs: list) -> list:
        raise NotImplementedError

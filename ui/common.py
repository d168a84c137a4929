"""What the playground's tabs share: errors worded as the API words them (a 400 next to the input
it names, a server that is down as one line), base64 PNGs to PIL images, range hints read from
each model's request JSON Schema (the describe API)."""
from __future__ import annotations

import base64
import io
from collections.abc import Callable, Generator, Iterator

import gradio as gr
import requests
from PIL import Image

from clients.api import ServerError, TorchServeClient


class FieldError(ValueError):
    """A problem with one input found before anything is sent (e.g. no image uploaded)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def failure_text(client: TorchServeClient, exc: Exception) -> str:
    """One line for a failed call, without a stack trace."""
    if isinstance(exc, requests.ConnectionError):
        return (f"TorchServe is not answering at {client.inference_url}: start it with make start "
                "(or run make ui, which starts it).")
    if isinstance(exc, requests.Timeout):
        return f"TorchServe did not answer within {client.timeout:.0f} s."
    if isinstance(exc, ServerError):
        body = exc.body if isinstance(exc.body, dict) else {}
        message = body.get("error") or body.get("message") or str(exc.body)[:300]
        field = f" (field `{body['field']}`)" if body.get("field") else ""
        return f"HTTP {exc.status}: {message}{field}"
    return str(exc)


class Fields:
    """One hidden error line under each input of a tab, keyed by the request field it names, and
    a status line for everything else. Event functions run through `guarded`."""

    def __init__(self, client: TorchServeClient, tab: str):
        self.client = client
        self.tab = tab
        self.slots: dict[str, gr.Markdown] = {}
        self.status: gr.Markdown | None = None

    def slot(self, field: str) -> None:
        """Place the error line of `field` here (right under its input)."""
        self.slots[field] = gr.Markdown(visible=False, elem_id=f"{self.tab}-{field}-error",
                                        elem_classes="field-error")

    def status_line(self) -> None:
        self.status = gr.Markdown(elem_id=f"{self.tab}-status", elem_classes="status-line")

    @property
    def outputs(self) -> list:
        return [*self.slots.values(), self.status]

    def clear(self, status: str = "") -> dict:
        return {**{md: gr.update(value="", visible=False) for md in self.slots.values()}, self.status: status}

    def failure(self, exc: Exception) -> dict:
        field = exc.field if isinstance(exc, FieldError) else (
            exc.body.get("field") if isinstance(exc, ServerError) and isinstance(exc.body, dict) else None)
        text = str(exc) if isinstance(exc, FieldError) else failure_text(self.client, exc)
        updates = self.clear()
        if field in self.slots:
            updates[self.slots[field]] = gr.update(value=f"⚠ {text}", visible=True)
            updates[self.status] = f"⚠ the request was refused: see `{field}` above."
        else:
            updates[self.status] = f"⚠ {text}"
        return updates

    def guarded(self, fn: Callable[..., Iterator[dict]]) -> Callable[..., Iterator[dict]]:
        """Runs a generator of {component: update} dicts; the tab's error lines are cleared while
        it runs and filled when the API (or a FieldError) refuses the request."""
        def run(*args):
            try:
                for updates in fn(*args):
                    yield {**self.clear(), **updates}
            except (FieldError, ServerError, requests.RequestException) as exc:
                yield self.failure(exc)
        return run


def streamed(client: TorchServeClient, model: str, payload: dict, progress: gr.Markdown,
             previews: gr.Gallery) -> Generator[dict, None, dict]:
    """Runs `payload` as a streaming request (`"stream": true`): yields updates of the progress
    line (step, elapsed, the server's ETA) and of the gallery (the previews) as the events
    arrive; returns the final response (use with `yield from`), or None when the request was
    cancelled (the progress line then says at which step). Errors raise ServerError."""
    try:
        return (yield from _events(client, model, payload, progress, previews))
    except ServerError as exc:
        if not (isinstance(exc.body, dict) and exc.body.get("cancelled")):
            raise
        yield {progress: f"cancelled at step {exc.body['stopped_at_step']}"
                         + (f" of {exc.body['total']}" if exc.body.get("total") else " (before it started)")}
        return None


def _events(client: TorchServeClient, model: str, payload: dict, progress: gr.Markdown,
            previews: gr.Gallery) -> Generator[dict, None, dict]:
    for event in client.stream(model, payload):
        kind = event["event"]
        if kind == "progress":
            eta = "" if event["eta_s"] is None else f" · ETA {event['eta_s']:.1f} s"
            yield {progress: f"step {event['step']}/{event['total']} · {event['elapsed_s']:.1f} s{eta}"}
        elif kind == "preview":
            yield {previews: [png(b) for b in event["images"]]}
        elif kind == "result":
            return event["response"]


def png(data: str | None) -> Image.Image | None:
    """A base64 image of a response as a PIL image (None stays None: a withheld image)."""
    return None if data is None else Image.open(io.BytesIO(base64.b64decode(data)))


def b64_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def schema_hint(schema: dict, field: str) -> str:
    """'1 .. 100, default 25' from a request JSON Schema property (null branches skipped)."""
    prop = schema.get("properties", {}).get(field, {})
    branch = next((b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"), prop)
    low = branch.get("minimum", branch.get("exclusiveMinimum"))
    high = branch.get("maximum")
    parts = []
    if low is not None and high is not None and high < 2**62:
        parts.append(f"{'>' if 'exclusiveMinimum' in branch else ''}{low} .. {high}")
    if branch.get("multipleOf"):
        parts.append(f"multiple of {branch['multipleOf']}")
    if "default" in prop and prop["default"] is not None:
        parts.append(f"default {prop['default']}")
    return ", ".join(parts)


def optional_number(text: str | None, field: str, kind: type = int) -> int | float | None:
    """An optional numeric input (a textbox: gr.Number cannot be left empty): empty = None, the
    model's default."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        raise FieldError(field, f"'{field}' must be {'an integer' if kind is int else 'a number'} "
                                f"or empty, got {text!r}") from None


def request_schema(client: TorchServeClient, model: str) -> dict:
    """The describe API's customized metadata of a model's default version."""
    return client.describe(model, customized=True)[0].get("customizedMetadata") or {}


def schema_updates(client: TorchServeClient, model: str, scheduler, hinted: dict) -> tuple[dict, dict]:
    """From the describe API: the scheduler dropdown's choices and default, and the range hint under
    each input of `hinted` ({component: request field}). Returns (Gradio updates, the metadata)."""
    meta = request_schema(client, model)
    schema = meta.get("request_schema", {})
    updates = {scheduler: gr.update(choices=meta.get("schedulers", []),
                                    value=schema["properties"]["scheduler"]["default"])}
    updates.update({component: gr.update(info=schema_hint(schema, name)) for component, name in hinted.items()})
    return updates, meta

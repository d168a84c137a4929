"""TorchServe's KServe envelopes, made to pass batches through to this project's handlers.

KServe's TorchServe runtime sets `TS_SERVICE_ENVELOPE=kserve|kservev2`; TorchServe then wraps the
handler's entry point in `ts.torch_handler.request_envelope.kserve` / `kservev2` before the
handler is initialised (`ts/model_loader.py`). Both stock envelopes read only the FIRST request of
a batch and return ONE response for the whole batch, so every request of a batch of 2+ would get
503 "number of batch response mismatched". The handlers speak both KServe protocols themselves,
per request (handlers/core/kserve.py), so they need no envelope: without `TS_SERVICE_ENVELOPE`
nothing here runs. When it is set, `pass_through()` — called from the handler's initialize, never
at import — makes that envelope class hand the raw batch to handlers of this project and their
answers back unchanged (other handlers keep the stock envelope), after checking that the
installed TorchServe is the release whose envelope it was written against. The envelope's
`handle` is already bound when initialize runs, so what changes is what it calls at request
time: its `parse_input` and `format_output`. An envelope set with `service_envelope` in
config.properties instead is not visible to the worker: leave it unset.

`KSERVE_STOCK_ENVELOPE=1` keeps the stock envelope (to show what it does; see the tests).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os

from handlers.core.batch import KSERVE_V1, KSERVE_V2

PROTOCOLS = {"kserve": KSERVE_V1, "kservev2": KSERVE_V2}
CLASSES = {"kserve": "KServeEnvelope", "kservev2": "KServev2Envelope"}
TORCHSERVE_VERSION = "0.12.0"  # the envelopes' `handle` this replaces is that release's (the last one)


def active() -> str | None:
    """The KServe protocol TorchServe's envelope speaks in this worker, or None."""
    return PROTOCOLS.get(os.environ.get("TS_SERVICE_ENVELOPE", ""))


def pass_through(handler_cls: type) -> None:
    """Lets this worker's KServe envelope pass whole batches to `handler_cls` instances."""
    name = os.environ.get("TS_SERVICE_ENVELOPE")
    if not name or os.environ.get("KSERVE_STOCK_ENVELOPE") == "1":
        return
    if name not in CLASSES:
        raise ValueError(f"TS_SERVICE_ENVELOPE={name!r}: these handlers speak {', '.join(CLASSES)} (or none)")
    installed = importlib.metadata.version("torchserve")
    if installed != TORCHSERVE_VERSION:
        raise RuntimeError(f"TS_SERVICE_ENVELOPE={name} needs torchserve {TORCHSERVE_VERSION}, found {installed}: "
                           "unset TS_SERVICE_ENVELOPE (the handlers speak KServe v1/v2 themselves)")
    cls = getattr(importlib.import_module(f"ts.torch_handler.request_envelope.{name}"), CLASSES[name])
    if getattr(cls.parse_input, "passes_through", False):
        return
    stock_parse, stock_format = cls.parse_input, cls.format_output

    def ours(envelope) -> bool:
        return isinstance(getattr(envelope._handle_fn, "__self__", None), handler_cls)

    def parse_input(self, data):
        return data if ours(self) else stock_parse(self, data)

    def format_output(self, data):
        return data if ours(self) else stock_format(self, data)

    parse_input.passes_through = True
    cls.parse_input, cls.format_output = parse_input, format_output

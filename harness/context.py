"""TorchServe's own MockContext, completed with the per-request parts of the real Context.

MockContext (ts.torch_handler.unit_tests) has no request headers and no per-request response
status; the handlers need both, so this subclass borrows those methods from ts.context.Context
and fills the request processors the way the TorchServe worker does for each batch.
"""
from __future__ import annotations

from pathlib import Path

from ts.context import Context, RequestProcessor
from ts.torch_handler.unit_tests.test_utils.mock_context import MockContext


class ServingMockContext(MockContext):
    request_processor = Context.request_processor
    get_request_header = Context.get_request_header
    get_all_request_header = Context.get_all_request_header
    set_response_content_type = Context.set_response_content_type
    get_response_content_type = Context.get_response_content_type
    get_response_status = Context.get_response_status
    set_response_status = Context.set_response_status
    get_response_headers = Context.get_response_headers
    set_response_header = Context.set_response_header

    def __init__(self, model_dir: str | Path, model_name: str, yaml_file: str | None = None):
        super().__init__(model_pt_file=None, model_dir=str(model_dir), model_file=None,
                         model_name=model_name, model_yaml_config_file=yaml_file)
        self.model_name = model_name  # the real Context has it; MockContext does not
        self.new_batch([{}])  # what initialize sees

    def new_batch(self, headers: list[dict], route: str | list[str] = "predictions") -> None:
        """Per-request headers of the next batch, e.g. [{"Accept": "image/png"}, {}], with what
        TorchServe's frontend adds for `route`: "predictions" (a `url_path` header, as
        /predictions/<model> and /explanations/<model> get), "kserve" (the v1 / v2 routes: none
        added) or "grpc" (no headers at all)."""
        added = {"predictions": {"url_path": ""}, "kserve": {}}
        routes = route if isinstance(route, list) else [route] * len(headers)
        self.request_processor = [RequestProcessor({} if r == "grpc" else {**added[r], **h})
                                  for h, r in zip(headers, routes)]

    def status(self, idx: int) -> int:
        code, _ = self.get_response_status(idx)
        return code or 200


def run_batch(handler, ctx: ServingMockContext, rows: list, headers: list[dict] | None = None,
              route: str = "predictions") -> list:
    """Calls handler.handle on one batch the way the worker does; returns the raw outputs."""
    ctx.new_batch(headers or [{} for _ in rows], route)
    return handler.handle(rows, ctx)

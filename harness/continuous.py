"""TorchServe 0.12's frontend and worker in continuous-batching mode, in-process: successive
handle() calls, continuing requests first with an empty body (`{}`) at whatever index they now
have, new arrivals after them up to the batch size; every message goes through ts's own
`create_predict_response`, which calls `context.stopping_criteria[idx]` and sets the
`ts_stream_next` header the frontend acts on."""
from __future__ import annotations

from dataclasses import dataclass, field

from ts.protocol.otf_message_handler import create_predict_response

from handlers.adapter.torchserve import TS_STREAM_NEXT


@dataclass
class Answer:
    """What the client of one request receives: status, content type and headers of its first
    message, every chunk, and how many handle() calls it took part in."""

    status: int
    content_type: str | None
    headers: dict
    chunks: list = field(default_factory=list)
    calls: int = 0
    streamed: bool = False

    @property
    def body(self) -> bytes:
        return b"".join(c if isinstance(c, bytes) else c.encode() for c in self.chunks)


class ContinuousWorker:
    """A stand-in for TorchServe's frontend + worker in continuous-batching mode."""

    def __init__(self, handler, ctx, batch_size: int):
        self.handler, self.ctx, self.batch_size = handler, ctx, batch_size
        self.queue: list[tuple[str, object, dict]] = []  # arrivals not yet admitted
        self.live: list[str] = []  # requests the backend holds (ts_stream_next true)
        self.answers: dict[str, Answer] = {}
        self.routes: dict[str, str] = {}
        self.calls = 0

    def submit(self, rid: str, body, headers: dict | None = None, route: str = "predictions") -> None:
        """route: "predictions" (REST) or "grpc" (no headers; the frontend drops a live gRPC job
        after its first message, so its first message must be its last)."""
        self.queue.append((rid, {"body": body}, headers or {}))
        self.routes[rid] = route

    def step(self) -> None:
        """One handle() call: continuing requests first ({}), then arrivals up to batchSize."""
        quota = self.batch_size - len(self.live)
        arrivals, self.queue = self.queue[:quota], self.queue[quota:]
        rids = self.live + [rid for rid, _, _ in arrivals]
        data = [{} for _ in self.live] + [row for _, row, _ in arrivals]
        self.ctx.new_batch([{} for _ in self.live] + [h for _, _, h in arrivals],
                           route=[self.routes[rid] for rid in rids])
        self.ctx.request_ids = dict(enumerate(rids))
        ret = self.handler.handle(data, self.ctx)
        self.calls += 1
        assert isinstance(ret, list) and len(ret) == len(data)  # one message per request, always
        create_predict_response(ret, self.ctx.request_ids, "Prediction success", 200, context=self.ctx)
        live = []
        for idx, rid in enumerate(rids):
            first = rid not in self.answers
            if first:
                code, _ = self.ctx.get_response_status(idx)
                self.answers[rid] = Answer(code or 200, self.ctx.get_response_content_type(idx),
                                           dict(self.ctx.get_response_headers(idx)))
            ans = self.answers[rid]
            ans.chunks.append(ret[idx])
            ans.calls += 1
            nxt = self.ctx.get_response_headers(idx).get(TS_STREAM_NEXT)
            if self.routes[rid] == "grpc" and nxt != "false":
                raise AssertionError(f"{rid}: a gRPC answer without ts_stream_next false (dropped or a frontend NPE)")
            if first and nxt == "false" and self.routes[rid] != "grpc":
                raise AssertionError(f"{rid}: True on its first call (the client would hang)")
            ans.streamed = ans.streamed or nxt is not None
            if nxt == "true":
                live.append(rid)
        self.live = live

    def drain(self, max_calls: int = 10_000) -> None:
        while self.live or self.queue:
            self.step()
            assert self.calls < max_calls

"""TorchServe's entry module for the `jobs` archive (archive.sh builds it beside ddpm and sd15):
`POST /predictions/jobs` with `{"action": "cancel" | "status", "model", "request_id"}`
(handlers/jobs/control.py, docs/jobs.md). It runs no model: its worker only reads and writes the
request ids' state, so a cancel never waits behind a generation."""
from __future__ import annotations

import json

from ts.torch_handler.base_handler import BaseHandler

from handlers.adapter.torchserve import apply_head, incoming
from handlers.core import answers
from handlers.core.batch import Outcome
from handlers.core.bodies import json_body
from handlers.core.errors import RequestError
from handlers.jobs.control import JobControl, JobsRequest


class JobsHandler(BaseHandler):
    def initialize(self, context):
        self.context = context
        config = (context.model_yaml_config or {}).get("handler") or {}
        self.control = JobControl(float(config["cancel_wait_s"]))
        self.initialized = True

    def preprocess(self, data: list) -> list:
        return [incoming(self.context, idx, row) for idx, row in enumerate(data)]

    def inference(self, batch: list, *args, **kwargs) -> list:
        replies = []
        for inc in batch:
            try:
                outcome = Outcome(response=self.control.answer(JobsRequest.parse(json_body(inc.body))))
            except RequestError as err:
                outcome = Outcome(error=err)
            replies.append(answers.rest(outcome, len(batch)))
        return replies

    def postprocess(self, replies: list) -> list:
        for idx, reply in enumerate(replies):
            apply_head(self.context, idx, reply)
        return [reply.body for reply in replies]

    def describe_handle(self) -> str:
        return json.dumps({"model": self.context.model_name, "request_schema": JobsRequest.json_schema(),
                           "models_with_ids": self.control.tracked()})

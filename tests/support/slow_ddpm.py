"""Test double: the ddpm handler with a UNet that sleeps `slow_unet_s` (model config, `handler:`)
before every call (with `torchscript: false`: a trace would drop the sleep), so a test can make a
request outlast TorchServe's responseTimeout on any machine. Archived with `archive.sh --handler
tests/support/slow_ddpm.py`; the worker measures the slowed UNet at load like any other
(handlers/core/budget.py StepClock)."""
from __future__ import annotations

import time

from handlers.ddpm.handler import DdpmHandler
from handlers.ddpm.model import DdpmModel


class SlowUnetDdpmHandler(DdpmHandler):
    # Nested: TorchServe's loader accepts one class defined at the top of an entry module.
    class model_type(DdpmModel):
        def load_unet(self, wdir: str):
            if self.config["torchscript"]:
                raise ValueError("slow_ddpm needs torchscript: false (a traced UNet would not keep the sleep)")
            unet = super().load_unet(wdir)
            delay = float(self.config["slow_unet_s"])
            forward = unet.forward

            def slow_forward(*args, **kwargs):
                time.sleep(delay)
                return forward(*args, **kwargs)

            unet.forward = slow_forward
            return unet

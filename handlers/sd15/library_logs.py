"""Log messages of diffusers and transformers that report nothing wrong, dropped at their loggers
so that worker logs show what matters. Each filter names the message and why it is wrong."""
from __future__ import annotations

import logging


class EmptyFloat32List(logging.Filter):
    """diffusers' "modules ... should be kept in float32: []". diffusers 0.42.1 logs it on every
    `ModelMixin.to(dtype)` (from_pipe's cast among them), also when the list is empty (its check
    `fp32_modules is not None` always holds): then nothing is kept or cast wrongly."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


class AdapterLoadReport(logging.Filter):
    """transformers' "LOAD REPORT" of a text-encoder LoRA that lists only MISSING keys. transformers
    5.23 (integrations/peft.py) counts the base model's weights and the other adapters' as missing
    from each adapter file, and calls them "newly initialized": nothing is (the LoRA's effect on the
    text encoder is tested). A report with another status (unexpected, mismatched) passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "LOAD REPORT" not in text:
            return True
        rows = [line for line in text.splitlines() if line.count("|") >= 2 and not line.startswith(("Key", "-"))]
        return not rows or not all("| MISSING" in row for row in rows)


FILTERS = {"diffusers.models.modeling_utils": EmptyFloat32List(), "transformers.integrations.peft": AdapterLoadReport()}


def quiet() -> None:
    """Installs the filters (once: a logger keeps one of each)."""
    for name, f in FILTERS.items():
        logging.getLogger(name).addFilter(f)

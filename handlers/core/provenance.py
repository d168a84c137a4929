"""What a generated PNG says about how it was made (docs/rest-api.md, "Images that say how they
were made"): two text chunks, written unless the request says `"metadata": false`.

- `parameters`: AUTOMATIC1111's infotext, which A1111's "PNG Info" tab, ComfyUI, InvokeAI and
  image viewers read: the prompt, a `Negative prompt:` line, then one line of `Key: value` pairs
  (Steps, Sampler, CFG scale, Seed, Size, Model hash, Model, ...).
- `serving`: this project's JSON record, for machines (`python -m clients.verify`): the whole
  request as the model resolved it (defaults filled in, the seed used), which of its images this
  is, the model, archive version, archive fingerprint and weights sha256, the torch version and
  the CPU architecture.

A1111's format is an informal one, defined by its parser (`parse_generation_parameters` in
modules/infotext_utils.py): no library writes it, hence this module.
"""
from __future__ import annotations

import json
from typing import Any

from PIL.PngImagePlugin import PngInfo

A1111_KEY = "parameters"
RECORD_KEY = "serving"
MODEL_HASH_CHARS = 10  # A1111's short "Model hash" (AutoV2: the first 10 hex digits of a sha256)


def a1111_parameters(prompt: str, negative_prompt: str, settings: dict[str, Any]) -> str:
    """A1111's infotext: prompt, `Negative prompt: ...` when there is one, then `Key: value, ...`
    (None values left out; a value with a comma or colon quoted as A1111 quotes it)."""
    def value(v: Any) -> str:
        text = str(v)
        return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text

    line = ", ".join(f"{k}: {value(v)}" for k, v in settings.items() if v is not None)
    lines = [prompt.replace("\n", " ")]
    if negative_prompt:
        lines.append("Negative prompt: " + negative_prompt.replace("\n", " "))
    return "\n".join([*lines, line])


def model_hash(archive: dict) -> str | None:
    digest = archive.get("weights_sha256")
    return digest[:MODEL_HASH_CHARS] if digest else None


def record(request: dict, image_index: int, archive: dict, runtime: dict) -> dict:
    """The machine-readable record of one image; `runtime`: the worker's (torch, machine)."""
    return {"request": request, "image_index": image_index,
            **{k: archive.get(k) for k in ("model", "version", "profile", "target", "fingerprint", "weights_sha256")},
            "torch": runtime["torch"], "machine": runtime["machine"]}


def png_info(parameters: str, machine_record: dict) -> PngInfo:
    """Both chunks: A1111's as plain text (what viewers show), the record compressed (it holds the
    whole request, an img2img input image included)."""
    info = PngInfo()
    info.add_text(A1111_KEY, parameters)
    info.add_text(RECORD_KEY, json.dumps(machine_record, separators=(",", ":")), zip=True)
    return info

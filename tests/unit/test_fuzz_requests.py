"""Property-based fuzzing of every handler's request parsing, in-process: random bytes, random
JSON and random values for the known fields always end as a 200 or a 400 naming a field —
never an unhandled exception, never a 500."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.context import run_batch

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bodies(fields: list[str]):
    """Raw bytes, text, any JSON, and objects built from the handler's own field names."""
    known = st.dictionaries(st.sampled_from(fields), JSON_VALUES, max_size=len(fields))
    return st.one_of(st.binary(max_size=300), st.text(max_size=100), JSON_VALUES, known,
                     known.map(lambda d: json.dumps(d).encode()))


def assert_clean(handler, ctx, body) -> None:
    good_and_bad = run_batch(handler, ctx, [{"body": body}])
    status = ctx.status(0)
    assert status in (200, 400), (status, good_and_bad)
    if status == 400:
        err = json.loads(good_and_bad[0])
        assert set(err) == {"error", "field"} and err["error"]


@FUZZ
@given(body=bodies(["image", "topk", "target", "method"]))
def test_cam_parsing_never_crashes(cam_handler, body):
    handler, ctx = cam_handler
    assert_clean(handler, ctx, body)


def capped(body, caps: dict):
    """Valid fuzzed requests would really generate: cap the integer fields that set the cost."""
    if not isinstance(body, dict):
        return body
    out = dict(body)
    for key, cap in caps.items():
        if isinstance(out.get(key), int) and not isinstance(out.get(key), bool):
            out[key] = min(out[key], cap)
    return out


@FUZZ
@given(body=bodies(["num_images", "steps", "scheduler", "eta", "seed", "trajectory"]))
def test_ddpm_parsing_never_crashes(ddpm_handler, body):
    handler, ctx = ddpm_handler
    assert_clean(handler, ctx, capped(body, {"steps": 3, "num_images": 2}))


@FUZZ
@given(body=bodies(["prompt", "negative_prompt", "steps", "guidance_scale", "width", "height", "seed",
                    "scheduler", "num_images", "image", "strength", "mask"]))
def test_sd15_parsing_never_crashes(sd15_handler, body):
    handler, ctx = sd15_handler
    body = capped(body, {"steps": 2, "num_images": 1, "width": 64, "height": 64})
    if isinstance(body, dict):  # the default size is 512x512: keep fuzzed generations small
        body = {"width": 64, "height": 64, **body}
    assert_clean(handler, ctx, body)

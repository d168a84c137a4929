"""benchmarks/results/real-size.json (`make bench-real`) holds every figure its report names, its
.md is generated from it, and what it recorded of the served 512-px request keeps the contract:
served, or refused up front with the message to stream it; streamed, complete with every step."""
from __future__ import annotations

import json

import pytest

from benchmarks import bench_real
from benchmarks.real_knobs import ERROR_BOUND, meets


@pytest.fixture(scope="module")
def results() -> dict:
    return json.loads(bench_real.JSON.read_text())


def test_the_json_has_every_figure(results):
    missing = []
    for path in bench_real.FIGURES:
        try:
            value = bench_real.get(results, path)
        except KeyError:
            missing.append(path)
            continue
        if value is None or value == [] or value == {}:
            missing.append(path)
    assert not missing, f"real-size.json lacks {missing}: run make bench-real"


def test_get_names_a_missing_figure():
    with pytest.raises(KeyError, match="sd15.streamed.total_s"):
        bench_real.get({"sd15": {"streamed": {}}}, "sd15.streamed.total_s")


def test_the_md_is_generated_from_the_json(results):
    assert (bench_real.RESULTS / "real-size.md").read_text() == bench_real.report(results)


def test_the_512px_request_is_served_or_refused_with_the_stream_message(results):
    plain = results["sd15"]["plain_request"]
    assert plain["status"] in (200, 400), plain
    if plain["status"] == 400:
        assert "stream" in plain["answer"], plain


def test_the_streamed_512px_request_completed_with_every_progress_event(results):
    streamed = results["sd15"]["streamed"]
    assert streamed["completed"], streamed
    steps = streamed["progress_steps"]  # PNDM's 25 steps are 26 UNet steps (its first is a plain one)
    assert steps[-1] >= bench_real.SD15_REQUEST["steps"]
    assert steps == list(range(steps[-1] + 1))


def test_every_worker_loaded_within_its_startup_timeout(results):
    for model in ("sd15", "ddpm", "cam"):
        assert results[model]["load_s"] < results[model]["startup_timeout_s"], model
        assert len(results[model]["peak_rss_mib_per_worker"]) == results[model]["workers"], model


def test_the_bar_needs_speed_and_a_bounded_error():
    assert meets("bf16_weights", 1.2, ERROR_BOUND)
    assert not meets("bf16_weights", 1.2, ERROR_BOUND * 2)
    assert not meets("channels_last", 1.1, 0.0)
    assert not meets("baseline", 1.0, 0.0)

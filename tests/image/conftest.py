"""The serving image run as an operator runs it (`make test-image`): podman, the published
loopback port, the token read from the container. harness/image.py runs the containers; the
figures (cold start, restart, drain counts, duration) go to benchmarks/results/image.json.

Collected only when TS_IMAGE names a built image (make test-image sets it), so `make test`
never runs or waits for them.
"""
from __future__ import annotations

import os
import time

import pytest

from harness import image

IMAGE = os.environ.get("TS_IMAGE")
MODELS = ["cam", "ddpm", "sd15"]

if not IMAGE:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session", autouse=True)
def duration():
    start = time.monotonic()
    yield
    image.record(test_image_seconds=round(time.monotonic() - start))


@pytest.fixture(scope="session")
def container():
    """The image with its baked-in models, as `podman run -d -p 127.0.0.1:PORT:8080 IMAGE`."""
    c = image.Container(IMAGE, "ts-image-test")
    c.run()
    try:
        cold = c.wait_ready(len(MODELS))
        image.record(cold_start_to_ready_seconds=round(cold, 1), image=IMAGE, size_bytes=image.image_size(IMAGE),
                     host={"cpus": os.cpu_count(), "podman": image.podman("--version").stdout.strip()})
        yield c
    finally:
        c.remove()

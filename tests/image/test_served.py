"""Served checks through the container's published port: every model answers, bad input is a 400
naming the field, no token is refused, NDJSON streams pass the proxy event by event, nothing runs
as root and only the inference port listens beyond loopback."""
from __future__ import annotations

import json

import pytest
import requests

from harness.bad_inputs import good_png

PAYLOADS = {
    "cam": good_png(),
    "ddpm": {"num_images": 2, "steps": 4, "seed": 5},
    "sd15": {"prompt": "a red handwritten 7", "steps": 2, "width": 64, "height": 64, "seed": 1},
}
# One case per model of harness/bad_inputs.py: (payload, the field the 400 names).
BAD = {
    "cam": (b"this is not an image", "body"),
    "ddpm": ({"num_images": 17}, "num_images"),
    "sd15": ({"prompt": "a lighthouse", "steps": 2, "width": 100, "height": 64}, "width"),
}
# What `podman exec` runs: the uids of every process, and the sockets listening beyond loopback.
PROCESSES = """
import glob, ipaddress, json
uids = set()
for p in glob.glob("/proc/[0-9]*/status"):
    try:
        uids.add(next(l.split()[1] for l in open(p) if l.startswith("Uid:")))
    except OSError:
        pass
def address(hexip):  # /proc/net/tcp{,6}: 32-bit words in host (little-endian) order
    raw = b"".join(bytes.fromhex(hexip[i:i + 8])[::-1] for i in range(0, len(hexip), 8))
    ip = ipaddress.ip_address(raw)
    return getattr(ip, "ipv4_mapped", None) or ip
public = []
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).readlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        ip, port = local.split(":")
        if state == "0A" and not address(ip).is_loopback:
            public.append(int(port, 16))
print(json.dumps({"uids": sorted(uids), "public": sorted(set(public))}))
"""


@pytest.mark.parametrize("model", PAYLOADS)
def test_model_answers(container, model):
    body = container.client(timeout=300).predict(model, PAYLOADS[model])
    if model == "cam":
        assert body["predictions"]
    else:
        assert len(body["images"]) == PAYLOADS[model].get("num_images", 1)


@pytest.mark.parametrize("model", BAD)
def test_bad_input_gets_400_with_the_field(container, model):
    payload, field = BAD[model]
    resp = container.client().predict_raw(model, payload)
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["field"] == field and body["error"]


def test_request_without_token_is_refused(container):
    resp = requests.post(f"{container.url}/predictions/cam", data=good_png(), timeout=60)
    assert resp.status_code in (400, 401) and "InvalidKeyException" in resp.text, resp.text
    wrong = requests.post(f"{container.url}/predictions/cam", data=good_png(), timeout=60,
                          headers={"Authorization": "Bearer not-the-key"})
    assert wrong.status_code in (400, 401) and "InvalidKeyException" in wrong.text, wrong.text


def test_stream_passes_the_proxy_event_by_event(container):
    events = list(container.client(timeout=300).stream("ddpm", {"num_images": 1, "steps": 6, "seed": 2}))
    progress = [e for e in events if e["event"] == "progress"]
    assert len(progress) >= 2 and events[-1]["event"] == "result"
    assert len(events[-1]["response"]["images"]) == 1


def test_non_root_and_only_inference_beyond_loopback(container):
    seen = json.loads(container.exec("python", "-c", PROCESSES).stdout)
    assert seen["uids"] == ["1000"], seen
    assert seen["public"] == [8080], seen
    assert container.exec("id", "-un").stdout.strip() == "model-server"

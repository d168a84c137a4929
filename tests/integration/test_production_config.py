"""config.production.properties against a real TorchServe, as another machine sees it.

The server runs in a network namespace of its own ("server", the config's fixed ports), started
the way docs/security.md says (`TS_CONFIG_FILE=config.production.properties torchserve --start
--ncs` in a directory holding model_store/). A second namespace ("client") is joined to it by a
veth pair and plays another machine. From there: inference answers with the token and refuses a
request without it; the management, metrics and both gRPC ports refuse the connection. From the
server's own loopback: registration is refused over REST and gRPC, so is unregistering, a
workflow archive is refused by allowed_urls, and with --ncs no config snapshot is written.
Needs root, unshare/nsenter and ip (harness/netns.py); without them the test is skipped, with
the reason.
"""
from __future__ import annotations

import json
import time
from urllib.parse import urlparse

import pytest

from harness import REPO
from harness.inprocess import held_out_digit
from harness.netns import Unavailable, link, namespace, user_env
from harness.torchserve import key_file_written, read_properties

CONFIG = REPO / "config.production.properties"
SERVER_IP, CLIENT_IP = "10.213.31.1", "10.213.31.2"


@pytest.fixture
def machines():
    """(server, client) namespaces joined by a veth pair."""
    try:
        with namespace() as server, namespace() as client:
            link(server, client, SERVER_IP, CLIENT_IP)
            yield server, client
    except Unavailable as err:
        pytest.skip(f"needs network namespaces of its own, to play another machine ({err})")


def ports(props: dict) -> dict[str, int]:
    found = {api: urlparse(props[f"{api}_address"]).port for api in ("inference", "management", "metrics")}
    found.update(grpc_inference=int(props["grpc_inference_port"]), grpc_management=int(props["grpc_management_port"]))
    return found


# On the server's loopback, with the management key: what may change the server.
SERVER_SIDE = """
import json, sys
import grpc, requests
from clients.api import ServerError, TorchServeClient
from clients.grpc_api import GrpcClient
from harness.torchserve import wait_listening
root, ports = sys.argv[1], json.loads(sys.argv[2])
key_file = root + "/key_file.json"
client = TorchServeClient(*(f"http://127.0.0.1:{ports[a]}" for a in ("inference", "management", "metrics")),
                          key_file=key_file)
wait_listening(client)
client.wait_ready(["cam"], timeout=300)

def status(call):
    try:
        call()
        return 200
    except ServerError as err:
        return err.status

seen = {"rest_register": status(lambda: client.register("cam.mar", model_name="cam2")),
        "rest_unregister": status(lambda: client.unregister("cam"))}
war = requests.post(f"http://127.0.0.1:{ports['management']}/workflows",
                    params={"url": f"file://{root}/model_store/steal.war"},
                    headers={"Authorization": f"Bearer {client.keys.management}"}, timeout=60)
seen["rest_workflow"] = [war.status_code, war.text]
with GrpcClient(f"127.0.0.1:{ports['grpc_inference']}", f"127.0.0.1:{ports['grpc_management']}",
                key_file=key_file) as g:
    pb = g.pb.management_pb2
    for name, call, request in (
            ("grpc_register", g.management.RegisterModel, pb.RegisterModelRequest(url="cam.mar", model_name="cam2")),
            ("grpc_unregister", g.management.UnregisterModel, pb.UnregisterModelRequest(model_name="cam"))):
        try:
            call(request, metadata=g.metadata(g.keys.management), timeout=60)
            seen[name] = "OK"
        except grpc.RpcError as err:
            seen[name] = err.code().name
# Scaling is allowed on loopback; without --ncs it would write a config snapshot.
client.scale("cam", 1, 1)
seen["models"] = [m["modelName"] for m in client.list_models()]
print(json.dumps(seen))
"""

# From the other machine: connect to every port, then ask with and without the token.
CLIENT_SIDE = """
import json, socket, sys
import requests
from clients.api import TorchServeClient
host, ports, key_file, image = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
seen = {"connect": {}}
for name, port in ports.items():
    with socket.socket() as s:
        s.settimeout(10)
        try:
            s.connect((host, port))
            seen["connect"][name] = "open"
        except ConnectionRefusedError:
            seen["connect"][name] = "refused"
        except OSError as err:
            seen["connect"][name] = repr(err)
body = open(image, "rb").read()
client = TorchServeClient(f"http://{host}:{ports['inference']}", f"http://{host}:{ports['management']}",
                          f"http://{host}:{ports['metrics']}", key_file=key_file)
answer = client.predict_raw("cam", body)
seen["with_token"] = [answer.status_code, answer.text]
bare = requests.post(f"http://{host}:{ports['inference']}/predictions/cam", data=body,
                     headers={"Content-Type": "application/octet-stream"}, timeout=60)
seen["without_token"] = [bare.status_code, bare.text]
print(json.dumps(seen))
"""


def test_production_config_serves_inference_only(tmp_path, machines):
    server, client = machines
    props = read_properties(CONFIG)
    by_api = ports(props)
    root = tmp_path / "root"
    (root / "model_store").mkdir(parents=True)
    (root / "model_store" / "cam.mar").symlink_to(REPO / "model_store" / "cam.mar")
    env = user_env(root)
    log = tmp_path / "torchserve.out"
    image = tmp_path / "digit.png"
    label = held_out_digit(image)

    # The venv's activate exports TS_CONFIG_FILE=config.properties, which beats --ts-config:
    # the production config is named through the same variable.
    start = f'TS_CONFIG_FILE="{CONFIG}" torchserve --start --ncs'
    try:
        assert server.shell(root, env, start, log, 120) == 0, log.read_text()[-3000:]
        deadline = time.monotonic() + 120
        while not key_file_written(root / "key_file.json"):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        own = server.python(SERVER_SIDE, str(root), json.dumps(by_api), timeout=400)
        assert own.returncode == 0, own.stderr[-3000:] + "\n" + log.read_text()[-3000:]
        other = client.python(CLIENT_SIDE, SERVER_IP, json.dumps(by_api), str(root / "key_file.json"), str(image),
                              timeout=200)
        assert other.returncode == 0, other.stderr[-3000:] + "\n" + log.read_text()[-3000:]
        print(own.stdout, other.stdout)
        local, remote = json.loads(own.stdout.splitlines()[-1]), json.loads(other.stdout.splitlines()[-1])
        text = log.read_text()
    finally:
        server.shell(root, env, "torchserve --stop", log, 60)

    assert f"Config file: {CONFIG}" in text
    # Nothing registered or removed, over REST or gRPC; no workflow archive fetched.
    assert local["rest_register"] == local["rest_unregister"] == 405
    assert local["grpc_register"] == local["grpc_unregister"] == "PERMISSION_DENIED"
    assert local["rest_workflow"][0] >= 400 and "allowed" in local["rest_workflow"][1].lower(), local["rest_workflow"]
    assert local["models"] == ["cam"]
    assert not (root / "logs" / "config").exists(), "a config snapshot was written despite --ncs"
    # Another machine reaches inference only, and only with the token.
    assert remote["connect"] == {api: "open" if api == "inference" else "refused" for api in by_api}
    status, body = remote["with_token"]
    assert status == 200, body
    assert json.loads(body)["predictions"][0]["index"] == label
    status, body = remote["without_token"]
    assert status in (400, 401) and "token" in body.lower(), (status, body)

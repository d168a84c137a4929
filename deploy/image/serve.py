"""The container's main process (under tini): TorchServe behind a small draining reverse proxy.

    serve.py [TORCHSERVE OPTION...]     e.g. --ts-config=/etc/torchserve/config.properties --model-store=...
    serve.py torchserve ARG...          runs that command as is, no proxy: the args of
                                        deploy/k8s/torchserve.yaml and deploy/kserve/servingruntime.yaml

Why hand-written: TorchServe 0.12 does not drain. On SIGTERM its frontend's stop() closes the
channels (ModelServer.java) and requests in flight are cut, and the `torchserve` launcher run as
PID 1 has no SIGTERM handler at all. So this process owns the public inference port itself: it
reads `inference_address` from the config, listens there, and starts TorchServe with a copy of the
config whose inference API is on loopback (UPSTREAM_PORT). Every request is forwarded (bodies
buffered up to max_request_size, responses streamed: chunked NDJSON passes through chunk by chunk).
On SIGTERM or SIGINT it stops admitting (the listening socket is closed; a new request on an open
keep-alive connection gets 503 and the connection is closed), waits for the requests in flight
(at most DRAIN_TIMEOUT seconds), then runs `torchserve --stop` and exits 0. If TorchServe exits by
itself, so does this process, with TorchServe's status (1 if that was 0).
Management, metrics and gRPC stay where the config puts them (loopback, not proxied).

Environment: UPSTREAM_PORT (default 8079), DRAIN_TIMEOUT (seconds, default 90; give the container
runtime more: `podman run --stop-timeout 120`, Kubernetes' terminationGracePeriodSeconds).
Standard library only; logs one line per event to stderr, prefixed [serve].
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_CONFIG = "/etc/torchserve/config.properties"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "trailers", "transfer-encoding", "upgrade", "content-length", "host", "expect"}


def log(msg: str) -> None:
    print(f"[serve] {msg}", file=sys.stderr, flush=True)


def properties(text: str) -> dict[str, str]:
    # As deploy/kserve_layout.parse_properties: the image holds none of the project's packages.
    props = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


class Gate:
    """Counts the requests in flight and closes the door on drain."""

    def __init__(self):
        self.cond = threading.Condition()
        self.in_flight = 0
        self.draining = False
        self.finished_during_drain = 0
        self.refused_during_drain = 0

    def enter(self) -> bool:
        with self.cond:
            if self.draining:
                self.refused_during_drain += 1
                return False
            self.in_flight += 1
            return True

    def leave(self) -> None:
        with self.cond:
            self.in_flight -= 1
            if self.draining:
                self.finished_during_drain += 1
            self.cond.notify_all()

    def close(self) -> int:
        """Stops admitting; returns the number in flight (each counted as finished when it leaves)."""
        with self.cond:
            self.draining = True
            return self.in_flight

    def wait(self, timeout: float) -> int:
        """Until nothing is in flight or the timeout; returns what is left."""
        with self.cond:
            self.cond.wait_for(lambda: self.in_flight == 0, timeout=timeout)
            return self.in_flight


class Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Seconds a client connection may stay silent (idle keep-alive, a stalled upload) before it is
    # closed; waiting for TorchServe's answer is not reading the client, so long requests are not cut.
    timeout = 300
    upstream: tuple[str, int]
    gate: Gate
    max_request_size: int

    def log_message(self, fmt, *args):  # TorchServe logs the requests itself (access_log)
        pass

    def _reply(self, status: int, error: str) -> None:
        body = json.dumps({"code": status, "type": "ServiceUnavailable" if status == 503 else "Error",
                           "error": error, "message": error}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _read_body(self) -> bytes | None:
        """The request body (Content-Length or chunked); None when it is over max_request_size."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts, size = [], 0
            while True:
                n = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                size += n
                if size > self.max_request_size:
                    return None
                parts.append(self.rfile.read(n))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.max_request_size:
            return None
        return self.rfile.read(length) if length else b""

    def _forward(self) -> None:
        if not self.gate.enter():
            self._reply(503, "the server is shutting down")
            return
        try:
            body = self._read_body()
            if body is None:
                self._reply(413, f"request body over max_request_size ({self.max_request_size} bytes)")
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            conn = http.client.HTTPConnection(*self.upstream, timeout=None)
            try:
                conn.request(self.command, self.path, body=body if body or self.command not in ("GET", "HEAD")
                             else None, headers=headers)
                resp = conn.getresponse()
                self._relay(resp)
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                if getattr(self, "_headers_sent", False):
                    self.close_connection = True
                elif isinstance(exc, ConnectionRefusedError):  # starting or restarting: clients retry 503
                    self._reply(503, "TorchServe is not listening yet")
                else:
                    self._reply(502, f"TorchServe is not answering ({type(exc).__name__})")
            finally:
                conn.close()
        finally:
            self.gate.leave()

    def _relay(self, resp: http.client.HTTPResponse) -> None:
        self.send_response_only(resp.status, resp.reason)
        length = resp.getheader("Content-Length")
        for key, value in resp.getheaders():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        chunked = length is None and not no_body
        if length is not None:
            self.send_header("Content-Length", length)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        if self.gate.draining:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self._headers_sent = True
        if no_body:
            return
        while True:
            data = resp.read1(65536)
            if not data:
                break
            if chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            else:
                self.wfile.write(data)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        if self.gate.draining:
            self.close_connection = True

    def handle_one_request(self):
        self._headers_sent = False
        super().handle_one_request()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _forward


def option(args: list[str], name: str, default: str | None) -> str | None:
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return default


def main(argv: list[str]) -> int:
    if argv and argv[0] == "torchserve":
        os.execvp(argv[0], argv)
    config = Path(option(argv, "--ts-config", DEFAULT_CONFIG))
    text = config.read_text()
    props = properties(text)
    public = urlsplit(props.get("inference_address", "http://127.0.0.1:8080"))
    if public.scheme != "http":
        raise SystemExit(f"serve.py: {config}: inference_address {public.geturl()}: only http is proxied")
    upstream_port = int(os.environ.get("UPSTREAM_PORT", "8079"))
    drain_timeout = float(os.environ.get("DRAIN_TIMEOUT", "90"))

    # TorchServe's copy of the config: inference on loopback, the rest unchanged.
    run_dir = Path(tempfile.mkdtemp(prefix="serve-"))
    lines = [f"inference_address=http://127.0.0.1:{upstream_port}" if line.split("=", 1)[0].strip() ==
             "inference_address" else line for line in text.splitlines()]
    (run_dir / "config.properties").write_text("\n".join(lines) + "\n")
    rest = [a for i, a in enumerate(argv) if not a.startswith("--ts-config")
            and not (i > 0 and argv[i - 1] == "--ts-config")]

    # A container restarted after a SIGKILL keeps /tmp: the old pid file would make the launcher
    # refuse to start if that pid is taken again. Nothing else runs TorchServe in this container.
    Path(tempfile.gettempdir(), ".model_server.pid").unlink(missing_ok=True)

    gate = Gate()
    Proxy.upstream = ("127.0.0.1", upstream_port)
    Proxy.gate = gate
    Proxy.max_request_size = int(props.get("max_request_size", 6553500))
    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer((public.hostname or "0.0.0.0", public.port or 80), Proxy)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="proxy", daemon=True).start()
    log(f"proxy {public.hostname}:{public.port} -> TorchServe inference 127.0.0.1:{upstream_port}")

    torchserve = [sys.executable, str(Path(sys.executable).parent / "torchserve")]
    ts = subprocess.Popen([*torchserve, "--start", "--foreground", "--ncs",
                           f"--ts-config={run_dir / 'config.properties'}", *rest])
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum, _frame):
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.is_set() and ts.poll() is None:
        stop.wait(0.5)
    if ts.poll() is not None:
        log(f"TorchServe exited by itself with {ts.returncode}")
        server.shutdown()
        return ts.returncode or 1

    started = time.monotonic()
    log(f"{received[0]}: draining, no new requests; {gate.close()} in flight")
    server.shutdown()       # the accept loop ends ...
    server.server_close()   # ... and the listening socket is closed: new connections are refused
    left = gate.wait(drain_timeout)
    log(f"drained in {time.monotonic() - started:.1f} s: {gate.finished_during_drain} finished, "
        f"{gate.refused_during_drain} refused, {left} still in flight (cut)")
    subprocess.run([*torchserve, "--stop", "--foreground"], check=False, stdout=subprocess.DEVNULL)
    try:
        ts.wait(timeout=60)
    except subprocess.TimeoutExpired:
        ts.kill()
        ts.wait()
    log(f"TorchServe stopped ({ts.returncode})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Timing helpers shared by the model benchmarks: interleaved repeats, percentiles, load runs."""
from __future__ import annotations

import http.client
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from harness import REPO


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn, alternating them so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def latency_ms(call: Callable[[], object], n: int) -> dict[str, float]:
    """p50/p95 of n sequential calls (concurrency 1), in ms."""
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": round(percentile(samples, 0.5), 1), "p95_ms": round(percentile(samples, 0.95), 1)}


def load(call: Callable[[int], object], total: int, concurrency: int) -> float:
    """Runs `total` calls from `concurrency` threads; returns calls per second."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(call, range(total)))
    return total / (time.perf_counter() - start)


class KeepAlivePoster:
    """POSTs over one keep-alive `http.client` connection per calling thread: the load generator of
    the served benchmarks whose requests take a few ms. requests spends about 1 ms of CPU per call
    (a quarter of a core at 300 calls/s, measured on cam), taken from the same 2 cores the server
    under test runs on; http.client spends about a third of that."""

    def __init__(self, base_url: str, token: str | None = None):
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname, parts.port
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.local = threading.local()

    def post(self, path: str, body: bytes) -> tuple[int, http.client.HTTPMessage, bytes]:
        """(status, headers, body) of POST `path`; reconnects once if the kept connection was closed."""
        for attempt in (0, 1):
            conn = getattr(self.local, "conn", None) or http.client.HTTPConnection(self.host, self.port, timeout=120)
            self.local.conn = conn
            try:
                conn.request("POST", path, body=body, headers=self.headers)
                resp = conn.getresponse()
                return resp.status, resp.headers, resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                self.local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


class ChildRounds:
    """An in-process measurement in a child process and session of its own (`python -m <module>
    <args>`), so it shares no threads with the parent: it prints "ready", then answers each "go"
    on stdin with a line "images/s <x>"; `round()` returns x."""

    def __init__(self, module: str, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        self._line("ready")

    def _line(self, prefix: str) -> str:
        for line in self.proc.stdout:  # libraries may print to the same stdout
            if line.startswith(prefix):
                return line
        raise RuntimeError(f"the in-process measurement {self.proc.args[2]} exited with {self.proc.wait()}")

    def round(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return float(self._line("images/s ").split()[1])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

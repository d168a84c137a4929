"""A small client library for this project's TorchServe: inference, explanations, management.

It reads TorchServe's `key_file.json` and sends the right Bearer token to each API, retries
503s (model still loading / worker restarting) with backoff, and on a refused token re-reads
the key file once (the server may have rotated the keys) before giving up with a clear error.
`stream()` iterates the NDJSON events of a streaming request (docs/streaming.md).
"""
from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

DEFAULT_INFERENCE = "http://127.0.0.1:8080"
DEFAULT_MANAGEMENT = "http://127.0.0.1:8081"
DEFAULT_METRICS = "http://127.0.0.1:8082"


class ServerError(RuntimeError):
    """An HTTP error from TorchServe, with the status and the server's message."""

    def __init__(self, status: int, body: Any, url: str):
        self.status = status
        self.body = body
        self.url = url
        msg = body.get("error") or body.get("message") if isinstance(body, dict) else str(body)[:300]
        field = f" (field '{body['field']}')" if isinstance(body, dict) and body.get("field") else ""
        super().__init__(f"HTTP {status} from {url}: {msg}{field}")


class StreamBroken(ServerError):
    """A stream that ended without its result: the worker died or the connection was cut."""

    def __init__(self, reason: str, url: str):
        super().__init__(502, {"error": f"the stream ended before its result ({reason})"}, url)


def _decode(resp: requests.Response) -> Any:
    if resp.headers.get("content-type", "").startswith("application/json"):
        return resp.json()
    try:
        return resp.json()
    except ValueError:
        return resp.content


def _is_token_refusal(resp: requests.Response) -> bool:
    # TorchServe 0.12 answers a missing/wrong/expired key with 400 InvalidKeyException.
    return resp.status_code in (400, 401) and "InvalidKeyException" in resp.text


@dataclass
class Keys:
    inference: str | None = None
    management: str | None = None
    api: str | None = None  # only for POST /token (key rotation)

    @classmethod
    def load(cls, path: str | os.PathLike | None) -> Keys:
        if path is None or not Path(path).is_file():
            return cls()
        data = json.loads(Path(path).read_text())
        return cls(
            inference=(data.get("inference") or {}).get("key"),
            management=(data.get("management") or {}).get("key"),
            api=(data.get("API") or {}).get("key"),
        )


class TorchServeClient:
    """Talks to one TorchServe. URLs and key file default to this repo's config.properties."""

    def __init__(
        self,
        inference_url: str | None = None,
        management_url: str | None = None,
        metrics_url: str | None = None,
        key_file: str | os.PathLike | None = None,
        timeout: float = 120.0,
        retries: int = 3,
    ):
        self.inference_url = (inference_url or os.environ.get("TS_INFERENCE_URL") or DEFAULT_INFERENCE).rstrip("/")
        self.management_url = (management_url or os.environ.get("TS_MANAGEMENT_URL") or DEFAULT_MANAGEMENT).rstrip("/")
        self.metrics_url = (metrics_url or os.environ.get("TS_METRICS_URL") or DEFAULT_METRICS).rstrip("/")
        self.key_file = key_file or os.environ.get("TS_KEY_FILE") or "key_file.json"
        self.keys = Keys.load(self.key_file)
        self.timeout = timeout
        self.session = requests.Session()
        retry = Retry(
            total=retries,
            status_forcelist=(503,),
            allowed_methods=None,  # inference POSTs are safe to repeat here: no side effects
            backoff_factor=0.5,
            raise_on_status=False,
        )
        self.session.mount("http://", HTTPAdapter(max_retries=retry, pool_maxsize=64))

    # plumbing -----------------------------------------------------------------------------
    def _request(self, api: str, method: str, url: str, **kwargs) -> requests.Response:
        for attempt in (0, 1):
            key = getattr(self.keys, api)
            headers = dict(kwargs.pop("headers", None) or {})
            if key:
                headers["Authorization"] = f"Bearer {key}"
            resp = self.session.request(method, url, headers=headers, timeout=self.timeout, **kwargs)
            if not _is_token_refusal(resp):
                return resp
            if attempt == 0:
                self.keys = Keys.load(self.key_file)  # rotated or expired: read the file again
                kwargs["headers"] = {k: v for k, v in headers.items() if k != "Authorization"}
        raise ServerError(
            resp.status_code,
            {"error": f"the server refused the {api} token from {self.key_file} (missing, wrong or "
                      "expired; a fresh one: POST /token?type=" + api + " on the management API)"},
            url,
        )

    def _checked(self, api: str, method: str, url: str, **kwargs) -> Any:
        resp = self._request(api, method, url, **kwargs)
        body = _decode(resp)
        if resp.status_code >= 400:
            raise ServerError(resp.status_code, body, url)
        return body

    @staticmethod
    def _path(model: str, version: str | None) -> str:
        return f"{model}/{version}" if version else model

    # inference API ------------------------------------------------------------------------
    def ping(self) -> dict:
        return self._checked("inference", "GET", f"{self.inference_url}/ping")

    def predict_raw(
        self, model: str, payload: dict | bytes, version: str | None = None, accept: str | None = None,
        explain: bool = False,
    ) -> requests.Response:
        """POST one request; returns the Response whatever its status (for tests and tools)."""
        endpoint = "explanations" if explain else "predictions"
        url = f"{self.inference_url}/{endpoint}/{self._path(model, version)}"
        headers = {"Accept": accept} if accept else {}
        if isinstance(payload, (bytes, bytearray)):
            headers["Content-Type"] = "application/octet-stream"
            return self._request("inference", "POST", url, data=payload, headers=headers)
        return self._request("inference", "POST", url, json=payload, headers=headers)

    def predict(self, model: str, payload: dict | bytes, version: str | None = None,
                accept: str | None = None, explain: bool = False) -> Any:
        resp = self.predict_raw(model, payload, version, accept, explain)
        body = _decode(resp)
        if resp.status_code >= 400:
            raise ServerError(resp.status_code, body, resp.url)
        return body

    def stream(self, model: str, payload: dict, version: str | None = None) -> Iterator[dict]:
        """Sends `payload` with `"stream": true` and yields its events as they arrive: `progress`
        ({step, total, elapsed_s, eta_s}), `preview` ({step, total, images}) and last `result`,
        whose `response` is what predict() returns. An error before the stream starts (400, 503)
        or an `error` event raises ServerError; a stream cut short raises StreamBroken. The client's
        timeout applies between two events, as TorchServe's responseTimeout does."""
        url = f"{self.inference_url}/predictions/{self._path(model, version)}"
        resp = self._request("inference", "POST", url, json={**payload, "stream": True}, stream=True)
        with resp:
            if resp.status_code >= 400:
                raise ServerError(resp.status_code, _decode(resp), url)
            if not resp.headers.get("content-type", "").startswith("application/x-ndjson"):
                raise ServerError(resp.status_code, {"error": "expected an NDJSON stream, got "
                                                     f"{resp.headers.get('content-type')!r}"}, url)
            try:
                for line in resp.iter_lines(chunk_size=None):  # None: each chunk as it arrives
                    if not line:
                        continue
                    event = json.loads(line)
                    if event.get("event") in ("error", "cancelled"):
                        raise ServerError(int(event.get("status") or 500), event, url)
                    yield event
                    if event.get("event") == "result":
                        return
            except requests.RequestException as exc:
                raise StreamBroken(type(exc).__name__, url) from exc
            raise StreamBroken("connection closed", url)

    # request ids: the `jobs` archive (docs/jobs.md) ---------------------------------------------
    def cancel(self, model: str, request_id: str) -> dict:
        """Cancels the `model` request with this id: running, it stops after its current step and
        is answered 499; not arrived yet, it is refused when it arrives within `cancel_wait_s`.
        The answer says which (`state`: cancelling, not running, or how it already ended)."""
        return self.predict("jobs", {"action": "cancel", "model": model, "request_id": request_id})

    def job_status(self, model: str, request_id: str) -> dict:
        """Where the `model` request with this id is: `state` running (with `step`, `total`,
        `eta_s`), finished, cancelled or failed; ServerError 404 when nothing is known of it."""
        return self.predict("jobs", {"action": "status", "model": model, "request_id": request_id})

    # management API -----------------------------------------------------------------------
    def list_models(self) -> list[dict]:
        return self._checked("management", "GET", f"{self.management_url}/models?limit=1000")["models"]

    def describe(self, model: str, version: str | None = None, customized: bool = False) -> list[dict]:
        """TorchServe's model description; `customized` adds the handler's own: the request
        JSON Schema with this archive's limits, schedulers / CAM methods, profile, target.

        A model served with continuous batching is never sent the customized describe: TorchServe
        0.12's frontend puts that job back on the model's queue for ever (docs/development.md),
        so its entries come back plain (no `customizedMetadata`)."""
        url = f"{self.management_url}/models/{self._path(model, version)}"
        plain = self._checked("management", "GET", url)
        if not customized or any(d.get("continuousBatching") for d in plain):
            return plain
        return self._checked("management", "GET", url, params={"customized": "true"})

    def register(self, url: str, model_name: str | None = None, batch_size: int | None = None,
                 max_batch_delay: int | None = None, initial_workers: int = 1,
                 response_timeout: int | None = None, synchronous: bool = True) -> dict:
        params = {"url": url, "initial_workers": initial_workers, "synchronous": str(synchronous).lower()}
        for key, value in (("model_name", model_name), ("batch_size", batch_size),
                           ("max_batch_delay", max_batch_delay), ("response_timeout", response_timeout)):
            if value is not None:
                params[key] = value
        return self._checked("management", "POST", f"{self.management_url}/models", params=params)

    def scale(self, model: str, min_worker: int, max_worker: int | None = None,
              version: str | None = None, synchronous: bool = True) -> dict:
        params = {"min_worker": min_worker, "max_worker": max_worker if max_worker is not None else min_worker,
                  "synchronous": str(synchronous).lower()}
        return self._checked("management", "PUT", f"{self.management_url}/models/{self._path(model, version)}",
                             params=params)

    def set_default(self, model: str, version: str) -> dict:
        return self._checked("management", "PUT", f"{self.management_url}/models/{model}/{version}/set-default")

    def unregister(self, model: str, version: str | None = None) -> dict:
        return self._checked("management", "DELETE", f"{self.management_url}/models/{self._path(model, version)}")

    def rotate_key(self, kind: str = "inference") -> None:
        """Asks the server for a new inference or management key (TorchServe rewrites
        key_file.json) and reloads the keys. Authorised by the API key of the key file."""
        resp = self.session.post(f"{self.management_url}/token", params={"type": kind}, timeout=self.timeout,
                                 headers={"Authorization": f"Bearer {self.keys.api}"})
        if resp.status_code >= 400:
            raise ServerError(resp.status_code, _decode(resp), resp.url)
        self.keys = Keys.load(self.key_file)

    def wait_ready(self, models: list[str] | None = None, timeout: float = 300.0) -> list[dict]:
        """Waits until every registered model (or the ones named) has all workers READY."""
        deadline = time.monotonic() + timeout
        last = "server not answering"
        while time.monotonic() < deadline:
            try:
                names = models or [m["modelName"] for m in self.list_models()]
                described = [d for name in names for d in self.describe(name)]
                pending = [d["modelName"] for d in described
                           if not d.get("workers") or any(w["status"] != "READY" for w in d["workers"])]
                if names and not pending:
                    return described
                last = f"not ready: {', '.join(pending) or 'no models registered'}"
            except (requests.ConnectionError, ServerError) as exc:
                last = str(exc)
            time.sleep(1.0)
        raise TimeoutError(f"TorchServe not ready after {timeout:.0f} s ({last})")

    def metrics(self) -> str:
        resp = self.session.get(f"{self.metrics_url}/metrics", timeout=self.timeout)
        resp.raise_for_status()
        return resp.text


def encode_file(path: str | os.PathLike) -> str:
    """A file's bytes as base64 text, for the JSON `image` / `mask` fields."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def save_b64_png(data: str, path: str | os.PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(data))
    return out

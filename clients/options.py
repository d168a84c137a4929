"""Command-line options every client script shares: server URLs, key file, timeout."""
from __future__ import annotations

import argparse

from clients.api import TorchServeClient


def add_server_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--inference-url", help="default $TS_INFERENCE_URL or http://127.0.0.1:8080")
    g.add_argument("--management-url", help="default $TS_MANAGEMENT_URL or http://127.0.0.1:8081")
    g.add_argument("--key-file", help="TorchServe's key_file.json (default $TS_KEY_FILE or ./key_file.json)")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per request")


def client_from(args: argparse.Namespace) -> TorchServeClient:
    return TorchServeClient(inference_url=args.inference_url, management_url=args.management_url,
                            key_file=args.key_file, timeout=getattr(args, "request_timeout", None) or args.timeout)

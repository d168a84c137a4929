"""Command line for TorchServe's management API: list, describe, register (with batch settings),
scale workers, set the default version, unregister, and wait until models are READY.

    python -m clients.manage list
    python -m clients.manage describe sd15          # incl. the request JSON Schema of the archive
    python -m clients.manage register cam.mar --batch-size 8 --max-batch-delay 50
    python -m clients.manage scale cam --min 2 --max 2
    python -m clients.manage set-default cam 2.0
    python -m clients.manage unregister cam [--version 1.0]
    python -m clients.manage wait [MODEL...] --timeout 300
"""
from __future__ import annotations

import argparse
import json
import sys

from clients.api import ServerError, TorchServeClient
from clients.options import add_server_options, client_from


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.manage", description=__doc__.split("\n\n")[0])
    add_server_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered models")
    p = sub.add_parser("describe", help="workers, batch settings, versions, request schema of one model")
    p.add_argument("model")
    p.add_argument("--version")
    p.add_argument("--no-customized", dest="customized", action="store_false",
                   help="skip the handler's description (request schema, schedulers, profile)")
    p = sub.add_parser("register", help="register an archive from the model store")
    p.add_argument("url", help="archive file name in the model store, e.g. cam.mar")
    p.add_argument("--name", help="model name (default: from the archive)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-batch-delay", type=int, help="ms to wait for a batch to fill")
    p.add_argument("--workers", type=int, default=1, help="initial workers")
    p.add_argument("--response-timeout", type=int, help="seconds")
    p = sub.add_parser("scale", help="set the number of workers")
    p.add_argument("model")
    p.add_argument("--min", type=int, required=True, dest="min_worker")
    p.add_argument("--max", type=int, dest="max_worker")
    p.add_argument("--version")
    p = sub.add_parser("set-default", help="make a version the default of its model")
    p.add_argument("model")
    p.add_argument("version")
    p = sub.add_parser("unregister", help="remove a model (or one version)")
    p.add_argument("model")
    p.add_argument("--version")
    p = sub.add_parser("wait", help="wait until the models (default: all) are READY")
    p.add_argument("models", nargs="*")
    p.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    client: TorchServeClient = client_from(args)
    try:
        if args.command == "list":
            result = client.list_models()
        elif args.command == "describe":
            result = client.describe(args.model, args.version, customized=args.customized)
        elif args.command == "register":
            result = client.register(args.url, model_name=args.name, batch_size=args.batch_size,
                                     max_batch_delay=args.max_batch_delay, initial_workers=args.workers,
                                     response_timeout=args.response_timeout)
        elif args.command == "scale":
            result = client.scale(args.model, args.min_worker, args.max_worker, args.version)
        elif args.command == "set-default":
            result = client.set_default(args.model, args.version)
        elif args.command == "unregister":
            result = client.unregister(args.model, args.version)
        else:
            described = client.wait_ready(args.models or None, timeout=args.timeout)
            result = {"ready": sorted({f"{d['modelName']}/{d['modelVersion']}" for d in described})}
    except (ServerError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make ui`: a Gradio web playground for the served models (Classify + CAM, DDPM sampler,
Stable Diffusion, Models), talking to TorchServe through clients/api.py. TorchServe's token is
read here, server side, from its key file; it never reaches the browser.

    python -m ui.app [--host 127.0.0.1] [--port 7860] [--auth user:password]
                     [--inference-url URL] [--management-url URL] [--key-file key_file.json]

Listening anywhere but loopback requires --auth; Gradio's public share links are never made.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported

import gradio as gr  # noqa: E402

from clients.api import TorchServeClient  # noqa: E402
from clients.options import add_server_options, client_from  # noqa: E402
from ui import cam_tab, ddpm_tab, models_tab, sd_tab  # noqa: E402

CSS = """
.pixelated img { image-rendering: pixelated; }
.field-error p { color: var(--error-text-color); font-weight: 600; }
"""


def build(client: TorchServeClient) -> gr.Blocks:
    with gr.Blocks(title="TorchServe playground", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"## TorchServe playground\nTorchServe at `{client.inference_url}` "
                    f"(management `{client.management_url}`)")
        cam_tab.build(demo, client)
        ddpm_tab.build(demo, client)
        sd_tab.build(demo, client)
        models_tab.build(demo, client)
    return demo


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ui.app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--auth", help="user:password for Gradio's login page; required with a non-loopback --host")
    add_server_options(parser)
    args = parser.parse_args(argv)
    auth = None
    if args.auth:
        user, _, password = args.auth.partition(":")
        if not user or not password:
            parser.error("--auth must be user:password")
        auth = (user, password)
    if not is_loopback(args.host):
        if auth is None:
            parser.error(f"--host {args.host} is not a loopback address: --auth user:password is required")
        print(f"WARNING: the playground listens on {args.host}: whoever reaches it and logs in can run every "
              "model and scale or switch model versions; the traffic is plain HTTP (put TLS in front).",
              file=sys.stderr)
    demo = build(client_from(args))
    demo.queue(default_concurrency_limit=8)
    demo.launch(server_name=args.host, server_port=args.port, share=False, auth=auth, css=CSS, ssr_mode=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

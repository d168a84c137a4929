"""DDPM sampler tab: scheduler, steps, eta, seed and number of images in; live progress and x0
previews from the streaming API, then a grid of samples and the trajectory animation (x0
estimates of the first image)."""
from __future__ import annotations

import base64
import tempfile
import uuid
from pathlib import Path

import gradio as gr

from clients.api import TorchServeClient
from ui.common import Fields, optional_number, png, schema_updates, streamed

MODEL = "ddpm"
# The GIFs handed to Gradio (it copies them into its cache); removed when the app exits.
_GIFS = tempfile.TemporaryDirectory(prefix="ui-ddpm-")


def build(demo: gr.Blocks, client: TorchServeClient) -> None:
    fields = Fields(client, MODEL)
    with gr.Tab("DDPM sampler", id="ddpm"):
        with gr.Row():
            with gr.Column(scale=1):
                scheduler = gr.Dropdown(label="Scheduler", elem_id="ddpm-scheduler")
                fields.slot("scheduler")
                steps = gr.Number(label="Steps", value=10, precision=0, elem_id="ddpm-steps")
                fields.slot("steps")
                eta = gr.Textbox(label="eta (ddim only)", placeholder="0", elem_id="ddpm-eta")
                fields.slot("eta")
                seed = gr.Textbox(label="Seed", placeholder="random", elem_id="ddpm-seed")
                fields.slot("seed")
                num_images = gr.Number(label="Number of images", value=8, precision=0, elem_id="ddpm-num-images")
                fields.slot("num_images")
                trajectory = gr.Checkbox(label="Trajectory animation", value=True, elem_id="ddpm-trajectory")
                run = gr.Button("Sample", variant="primary", elem_id="ddpm-run")
                fields.status_line()
            with gr.Column(scale=2):
                info = gr.Markdown(elem_id="ddpm-info")
                gallery = gr.Gallery(label="Samples", columns=8, format="png", object_fit="contain",
                                     elem_id="ddpm-gallery", elem_classes="pixelated", height="auto", preview=False)
                animation = gr.Image(label="Trajectory (x0 estimates of the first image)", interactive=False,
                                     elem_id="ddpm-trajectory-gif", elem_classes="pixelated", height=200)

    def load():
        updates, _ = schema_updates(client, MODEL, scheduler, {steps: "steps", eta: "eta", num_images: "num_images"})
        yield updates

    def sample(scheduler_, steps_, eta_, seed_, num_images_, trajectory_):
        payload = {"scheduler": scheduler_, "steps": steps_, "eta": optional_number(eta_, "eta", float),
                   "seed": optional_number(seed_, "seed"),
                   "num_images": num_images_, "trajectory": trajectory_}
        payload = {k: v for k, v in payload.items() if v is not None}
        yield {info: f"sampling {steps_} steps ..."}
        result = yield from streamed(client, MODEL, payload, info, gallery)
        if result is None:  # cancelled by its id elsewhere: the progress line says at which step
            return
        gif = None
        if result.get("trajectory"):
            gif = Path(_GIFS.name) / f"trajectory-{uuid.uuid4().hex}.gif"
            gif.write_bytes(base64.b64decode(result["trajectory"]))
        eta_text = f", eta {result['eta']}" if result.get("eta") is not None else ""
        yield {
            gallery: [png(b) for b in result["images"]],
            animation: str(gif) if gif else None,
            info: f"seed **{result['seed']}** · {result['steps']} steps · {result['scheduler']}{eta_text}",
        }

    demo.load(fields.guarded(load), outputs=[scheduler, steps, eta, num_images, *fields.outputs])
    run.click(fields.guarded(sample), inputs=[scheduler, steps, eta, seed, num_images, trajectory],
              outputs=[gallery, animation, info, *fields.outputs])

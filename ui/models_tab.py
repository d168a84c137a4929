"""Models tab: what the management API says (models, versions, workers, batch settings, each
model's request schema from the describe API), scaling workers and setting the default version."""
from __future__ import annotations

import gradio as gr

from clients.api import TorchServeClient
from ui.common import FieldError, Fields

COLUMNS = ["model", "version", "default", "workers (ready/all)", "min-max workers", "batch size",
           "max batch delay ms", "response timeout s", "archive"]


def overview(client: TorchServeClient) -> tuple[list[list], list[str]]:
    """One table row per registered model version, and the "model/version" names."""
    rows, names = [], []
    for model in sorted(m["modelName"] for m in client.list_models()):
        default = client.describe(model)[0]["modelVersion"]
        for d in client.describe(model, "all"):
            workers = d.get("workers") or []
            ready = sum(w["status"] == "READY" for w in workers)
            rows.append([model, d["modelVersion"], "yes" if d["modelVersion"] == default else "",
                         f"{ready}/{len(workers)}", f"{d['minWorkers']}-{d['maxWorkers']}", d["batchSize"],
                         d["maxBatchDelay"], d["responseTimeout"], d["modelUrl"]])
            names.append(f"{model}/{d['modelVersion']}")
    return rows, names


def split(name: str | None) -> tuple[str, str]:
    if not name:
        raise FieldError("model", "no model version chosen (none registered?)")
    model, version = name.split("/")
    return model, version


def build(demo: gr.Blocks, client: TorchServeClient) -> None:
    fields = Fields(client, "models")
    with gr.Tab("Models", id="models"):
        refresh = gr.Button("Refresh", elem_id="models-refresh")
        table = gr.Dataframe(headers=COLUMNS, interactive=False, elem_id="models-table")
        with gr.Row():
            with gr.Column(scale=1):
                chosen = gr.Dropdown(label="Model version", elem_id="models-chosen")
                with gr.Row():
                    min_workers = gr.Number(label="Min workers", value=1, precision=0, elem_id="models-min-workers")
                    max_workers = gr.Number(label="Max workers", value=1, precision=0, elem_id="models-max-workers")
                with gr.Row():
                    scale = gr.Button("Scale workers", elem_id="models-scale")
                    default = gr.Button("Set as default version", elem_id="models-set-default")
                fields.status_line()
            with gr.Column(scale=2):
                schema = gr.JSON(label="Request schema and handler metadata (describe API)", elem_id="models-schema")

    def state(name: str | None) -> dict:
        rows, names = overview(client)
        name = name if name in names else (names[0] if names else None)
        meta = client.describe(*name.split("/"), customized=True)[0].get("customizedMetadata") if name else None
        return {table: rows, chosen: gr.update(choices=names, value=name), schema: meta}

    def show(name):
        yield state(name)

    def scale_workers(name, low, high):
        model, version = split(name)
        client.scale(model, low, high, version=version)
        yield {**state(name), fields.status: f"{name}: workers scaled to {low}-{high}"}

    def set_default(name):
        model, version = split(name)
        client.set_default(model, version)
        yield {**state(name), fields.status: f"{name} is now the default version of {model}"}

    outputs = [table, chosen, schema, *fields.outputs]
    demo.load(fields.guarded(show), inputs=chosen, outputs=outputs)
    refresh.click(fields.guarded(show), inputs=chosen, outputs=outputs)
    chosen.input(fields.guarded(show), inputs=chosen, outputs=outputs)
    scale.click(fields.guarded(scale_workers), inputs=[chosen, min_workers, max_workers], outputs=outputs)
    default.click(fields.guarded(set_default), inputs=chosen, outputs=outputs)

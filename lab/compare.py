"""Compare versions of the `cam` model on a labelled image folder by POSTing every image to each
version (/predictions/cam/<version>): accuracy per version and per class, and the images where
the versions disagree. Writes the figures as JSON and, with --html, a report that shows the
disagreeing images with each version's CAM overlay side by side.

    python -m lab.compare data/shifted-digits/test [--versions 1.0 2.0] [--out outputs/compare.json]
                              [--html outputs/compare.html]

The folder has one subfolder per class, named like the model's labels (ImageFolder layout); a
`test` subfolder is used when present. Without --versions every registered version is compared.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import mimetypes
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image
from tqdm import tqdm

from clients.api import ServerError, TorchServeClient
from clients.options import add_server_options, client_from
from weights.image_folder import ImageFolderError, read_image_folder


class CompareError(ValueError):
    """The versions cannot be compared; the message says why."""


def labelled_images(folder: Path) -> list[tuple[Path, str]]:
    """(image, class) pairs of a labelled folder (its test/ if present), read and checked by
    weights.image_folder before any request is sent."""
    data = read_image_folder(folder, "test")
    return [(Path(path), data.classes[target]) for path, target in data.samples]


def _version_key(version: str):
    return tuple(int(p) if p.isdigit() else p for p in version.split("."))


def registered_versions(client: TorchServeClient, model: str = "cam") -> list[str]:
    return sorted((d["modelVersion"] for d in client.describe(model, "all")), key=_version_key)


def predict_all(client: TorchServeClient, items: list[tuple[Path, str]], version: str, model: str = "cam",
                concurrency: int = 8, overlays: bool = False) -> list[dict]:
    """Top-1 {"label", "probability"} (+ "overlay") of every image from one version, in order."""
    def one(item):
        path = item[0]
        try:
            result = client.predict(model, path.read_bytes(), version=version)
        except ServerError as exc:
            raise CompareError(f"{path}: {exc}") from None
        top = result["predictions"][0]
        return {"label": top["label"], "probability": top["probability"],
                **({"overlay": result["cam"]["overlay"]} if overlays else {})}

    with ThreadPoolExecutor(concurrency) as pool:
        return list(tqdm(pool.map(one, items), total=len(items), desc=f"{model} {version}", unit="img",
                         file=sys.stderr, leave=False))


def compare(client: TorchServeClient, items: list[tuple[Path, str]], versions: list[str] | None = None,
            model: str = "cam", concurrency: int = 8, overlays: bool = False) -> dict:
    """The comparison as a JSON-ready dict; with overlays=True it also holds, under "_overlays",
    each version's CAM overlay of the disagreeing images (for write_html; not written to JSON)."""
    registered = registered_versions(client, model)
    versions = versions or registered
    missing = [v for v in versions if v not in registered]
    if missing:
        raise CompareError(f"{model} has no version {', '.join(missing)} (registered: {', '.join(registered)})")
    truth = [label for _, label in items]
    classes = sorted(set(truth))
    result: dict = {"model": model, "images": len(items), "classes": {c: truth.count(c) for c in classes},
                    "versions": {}, "disagreements": []}
    predicted = {}
    for version in versions:
        start = time.perf_counter()
        predicted[version] = predict_all(client, items, version, model, concurrency, overlays)
        seconds = time.perf_counter() - start
        hits = [p["label"] == t for p, t in zip(predicted[version], truth)]
        result["versions"][version] = {
            "accuracy": sum(hits) / len(hits),
            "correct": sum(hits),
            "per_class": {c: sum(h for h, t in zip(hits, truth) if t == c) / truth.count(c) for c in classes},
            "seconds": round(seconds, 2),
            "images_per_second": round(len(items) / seconds, 1),
        }
    overlay_rows = []
    for i, (path, label) in enumerate(items):
        answers = {v: predicted[v][i] for v in versions}
        if len({a["label"] for a in answers.values()}) > 1:
            result["disagreements"].append({"image": str(path), "label": label, "versions": {
                v: {"label": a["label"], "probability": a["probability"]} for v, a in answers.items()}})
            if overlays:
                overlay_rows.append({v: a["overlay"] for v, a in answers.items()})
    if overlays:
        result["_overlays"] = overlay_rows
    return result


def print_table(result: dict, show: int = 10) -> None:
    versions = list(result["versions"])
    print(f"\n{result['model']}: {result['images']} images, {len(result['classes'])} classes")
    print(f"{'class':>8} {'images':>7}  " + "  ".join(f"{v:>8}" for v in versions))
    for cls, count in result["classes"].items():
        print(f"{cls:>8} {count:>7}  "
              + "  ".join(f"{result['versions'][v]['per_class'][cls]:>8.1%}" for v in versions))
    print(f"{'all':>8} {result['images']:>7}  "
          + "  ".join(f"{result['versions'][v]['accuracy']:>8.1%}" for v in versions))
    disagreements = result["disagreements"]
    print(f"\n{len(disagreements)} images where the versions disagree"
          + (f" (first {min(show, len(disagreements))}):" if disagreements and show else ""))
    for d in disagreements[:show]:
        answers = ", ".join(f"{v}: {a['label']} ({a['probability']:.2f})" for v, a in d["versions"].items())
        print(f"  {d['image']}  label {d['label']}  {answers}")


def write_json(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=2) + "\n")
    return path


def write_html(result: dict, path: Path, limit: int = 200) -> Path:
    """A self-contained page: accuracy table, then the disagreeing images (first `limit`) with
    each version's answer and CAM overlay side by side."""
    versions = list(result["versions"])

    def img(data: str, mime: str = "image/png") -> str:
        return f'<img src="data:{mime};base64,{data}" width="128" height="128">'

    def jpeg(png_b64: str) -> str:  # a fifth of the PNG's size: the page stays a few MB
        buf = io.BytesIO()
        Image.open(io.BytesIO(base64.b64decode(png_b64))).convert("RGB").save(buf, "JPEG", quality=85)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    head = "".join(f"<th>{html.escape(v)}</th>" for v in versions)
    rows = [f"<tr><td>{html.escape(c)}</td><td>{n}</td>"
            + "".join(f"<td>{result['versions'][v]['per_class'][c]:.1%}</td>" for v in versions) + "</tr>"
            for c, n in result["classes"].items()]
    rows.append(f"<tr><th>all</th><th>{result['images']}</th>"
                + "".join(f"<th>{result['versions'][v]['accuracy']:.1%}</th>" for v in versions) + "</tr>")
    cards = []
    for d, overlays in list(zip(result["disagreements"], result.get("_overlays", [])))[:limit]:
        source = Path(d["image"])
        mime = mimetypes.guess_type(source.name)[0] or "image/png"
        cells = [f"<td>{img(base64.b64encode(source.read_bytes()).decode('ascii'), mime)}<br>"
                 f"label <b>{html.escape(d['label'])}</b><br><small>{html.escape(source.name)}</small></td>"]
        for v in versions:
            a = d["versions"][v]
            ok = "ok" if a["label"] == d["label"] else "wrong"
            cells.append(f'<td>{img(jpeg(overlays[v]), "image/jpeg")}<br><span class="{ok}">{html.escape(v)}: '
                         f"{html.escape(a['label'])} ({a['probability']:.2f})</span></td>")
        cards.append("<tr>" + "".join(cells) + "</tr>")
    shown = min(limit, len(result["disagreements"]))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(result['model'])} versions compared</title>
<style>body{{font-family:sans-serif}} td,th{{padding:4px 8px;text-align:center}}
.ok{{color:#070}} .wrong{{color:#b00}}</style></head><body>
<h1>{html.escape(result['model'])}: {' vs '.join(map(html.escape, versions))}</h1>
<h2>Accuracy on {result['images']} images</h2>
<table><tr><th>class</th><th>images</th>{head}</tr>{''.join(rows)}</table>
<h2>{len(result['disagreements'])} images where the versions disagree (showing {shown})</h2>
<p>Input, then each version's answer with its class activation map of that answer.</p>
<table><tr><th>input</th>{head}</tr>{''.join(cards)}</table>
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="class-per-subfolder image folder (its test/ if present)")
    parser.add_argument("--versions", nargs="+", help="versions to compare (default: every registered one)")
    parser.add_argument("--model", default="cam")
    parser.add_argument("--out", type=Path, default=Path("outputs/compare.json"))
    parser.add_argument("--html", type=Path, help="also write an HTML report of the disagreements here")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--show", type=int, default=10, help="disagreements to print")
    add_server_options(parser)
    args = parser.parse_args(argv)
    try:
        items = labelled_images(args.folder)
        result = compare(client_from(args), items, args.versions, args.model, args.concurrency,
                         overlays=args.html is not None)
    except (ServerError, CompareError, ImageFolderError, OSError, requests.RequestException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_table(result, args.show)
    print(f"\nwrote {write_json(result, args.out)}")
    if args.html:
        print(f"wrote {write_html(result, args.html)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

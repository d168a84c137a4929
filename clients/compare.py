"""Compare versions of the `cam` model on a labelled image folder by POSTing every image to each
version (/predictions/cam/<version>): accuracy per version, per class, and the images where the
versions disagree. Writes the figures as JSON.

    python -m clients.compare data/shifted-digits/test --versions 1.0 2.0 [--out outputs/compare.json]

The folder has one subfolder per class, named like the model's labels (ImageFolder layout); a
`test` subfolder is used when present.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from clients.api import ServerError, TorchServeClient
from clients.options import add_server_options, client_from


def labelled_images(folder: Path) -> list[tuple[Path, str]]:
    folder = folder / "test" if (folder / "test").is_dir() else folder
    items = [(p, d.name) for d in sorted(folder.iterdir()) if d.is_dir()
             for p in sorted(d.iterdir()) if p.suffix.lower() in IMG_EXTENSIONS]
    if not items:
        raise ValueError(f"no labelled images in {folder} (expected {folder}/<class>/<image>)")
    return items


def compare(client: TorchServeClient, items: list[tuple[Path, str]], versions: list[str],
            model: str = "cam", concurrency: int = 8) -> dict:
    def top1(job):
        (path, _), version = job
        return client.predict(model, path.read_bytes(), version=version)["predictions"][0]["label"]

    predicted: dict[str, list[str]] = {}
    with ThreadPoolExecutor(concurrency) as pool:
        for version in versions:
            jobs = [(item, version) for item in items]
            predicted[version] = list(tqdm(pool.map(top1, jobs), total=len(jobs), desc=f"{model} {version}"))
    truth = [label for _, label in items]
    result: dict = {"model": model, "images": len(items), "versions": {}}
    for version, preds in predicted.items():
        per_class: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for p, t in zip(preds, truth):
            per_class[t][0] += p == t
            per_class[t][1] += 1
        result["versions"][version] = {
            "accuracy": sum(p == t for p, t in zip(preds, truth)) / len(truth),
            "correct": sum(p == t for p, t in zip(preds, truth)),
            "per_class": {c: ok / n for c, (ok, n) in sorted(per_class.items())},
        }
    result["disagreements"] = [
        {"image": str(path), "label": label, **{v: predicted[v][i] for v in versions}}
        for i, (path, label) in enumerate(items) if len({predicted[v][i] for v in versions}) > 1
    ]
    return result


def print_table(result: dict, show: int = 10) -> None:
    versions = list(result["versions"])
    print(f"\n{result['images']} images")
    print(f"{'class':>8}  " + "  ".join(f"{v:>8}" for v in versions))
    for cls in result["versions"][versions[0]]["per_class"]:
        print(f"{cls:>8}  " + "  ".join(f"{result['versions'][v]['per_class'][cls]:>8.1%}" for v in versions))
    print(f"{'all':>8}  " + "  ".join(f"{result['versions'][v]['accuracy']:>8.1%}" for v in versions))
    print(f"\n{len(result['disagreements'])} images where the versions disagree"
          + (f" (first {show}):" if result["disagreements"] else ""))
    for d in result["disagreements"][:show]:
        print(f"  {d['image']}: label {d['label']}, " + ", ".join(f"{v} says {d[v]}" for v in versions))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--versions", nargs="+", required=True)
    parser.add_argument("--model", default="cam")
    parser.add_argument("--out", type=Path, default=Path("outputs/compare.json"))
    add_server_options(parser)
    args = parser.parse_args(argv)
    try:
        result = compare(client_from(args), labelled_images(args.folder), args.versions, args.model)
    except (ServerError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

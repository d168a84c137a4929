"""`make bench`: runs each model's benchmark and writes benchmarks/results/latest.json + .md.

    python -m benchmarks.run [cam ddpm ddpm_workload sd15 loras limits streaming jobs]

Results of models not run this time are kept from the previous latest.json. Each figure is a
ratio or a latency measured within one run (this machine is noisy: compare ratios, not times).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import operator
import platform
import re
import sys
import time
from pathlib import Path

import torch

from benchmarks import RESULTS

# benchmarks/bench_<name>.py; limits: speed estimates; ddpm_workload: static vs step-level batching;
# streaming: what NDJSON progress and previews cost; loras: what LoRAs per request cost; jobs: how
# fast a cancel stops a request
MODELS = ("cam", "ddpm", "ddpm_workload", "sd15", "loras", "limits", "streaming", "jobs")
# A goal is machine-checkable when it starts with a comparison and a plain number (not a percentage).
GOAL = re.compile(r"\s*(>=|<=|>|<)\s*(-?\d+(?:\.\d+)?)(?![\d.])(?!\s*%)")
COMPARE = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def goal_result(value, goal: str) -> str:
    """'met' or 'MISSED' for a machine-checkable goal (a comparison with a number, e.g. '>= 1.8',
    optionally followed by free text); '' for a free-text goal or a non-numeric value."""
    match = GOAL.match(goal or "")
    if match is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    return "met" if COMPARE[match.group(1)](value, float(match.group(2))) else "MISSED"


def write_report(results: dict) -> Path:
    lines = ["# Benchmark results", "",
             f"Run {results['meta']['date']} on {results['meta']['machine']} "
             f"({results['meta']['cpus']} CPUs, torch {results['meta']['torch']}).",
             "Ratios are measured within one run; absolute times vary with machine load.", ""]
    checked = [(f"{model}.{key}", goal_result(results[model].get(key), goal))
               for model in MODELS if model in results
               for key, goal in results[model].get("goals", {}).items()]
    missed = [name for name, result in checked if result == "MISSED"]
    met = sum(result == "met" for _, result in checked)
    lines += [f"Goals: {met} met, {len(missed)} MISSED" + (f" ({', '.join(missed)})." if missed else "."), ""]
    for model in MODELS:
        if model not in results:
            continue
        lines += [f"## {model}", "", "| metric | value | goal | result |", "|---|---|---|---|"]
        goals = results[model].get("goals", {})
        for key, value in results[model].items():
            if key in ("goals", "notes"):
                continue
            goal = goals.get(key, "")
            result = goal_result(value, goal)
            lines.append(f"| {key} | {json.dumps(value)} | {goal} | {'**MISSED**' if result == 'MISSED' else result} |")
        for note in results[model].get("notes", []):
            lines += ["", f"- {note}"]
        lines.append("")
    path = RESULTS / "latest.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=list(MODELS))
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    latest = RESULTS / "latest.json"
    results = json.loads(latest.read_text()) if latest.exists() else {}
    results["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.machine(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    for model in args.models:
        module = f"benchmarks.bench_{model}"
        if importlib.util.find_spec(module) is None:
            continue
        print(f"== benchmark {model}", flush=True)
        results[model] = importlib.import_module(module).run()
        latest.write_text(json.dumps(results, indent=2) + "\n")
    report = write_report(results)
    print(json.dumps(results, indent=2))
    print(f"wrote {latest} and {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

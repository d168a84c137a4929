"""A discrete-event model of the ddpm workload benchmark (bench_ddpm_workload.py): what static and
step-level batching would reach on the same arrivals with no serving overheads beyond the
measured ones. Not a measurement: it answers "is the p95 goal reachable on this machine at all?"
and compares lane policies cheaply before one is built and measured.

Cost model (measured on this machine, one thread, TorchScript UNet of the demo model, README
"Step-level batching"): a UNet call on n images takes UNET_FIXED_S + UNET_PER_IMAGE_S x n; each
request costs PER_REQUEST_S per step in Python (scale_model_input, scheduler.step); every
handle() call costs ROUND_TRIP_S in the frontend. Batching rules from the shipped configs
(cpu.yaml: workers, batchSize, maxBatchDelay; cpu-step.yaml: batchSize, step_slice_ms, lanes).
Left out: the GIL held by the Python parts, per-image cost growing above ~10 images per call,
the load generator and TorchServe's frontend sharing the two cores.

    python -m benchmarks.workload_model [--seeds 14,15,...]
"""
from __future__ import annotations

import argparse
import statistics

from benchmarks.bench_ddpm_workload import SEED, UTILISATIONS, configs, workload
from benchmarks.measure import percentile

UNET_FIXED_S = 1.55e-3
UNET_PER_IMAGE_S = 0.70e-3
PER_REQUEST_S = 0.15e-3
ROUND_TRIP_S = 2e-3
MEAN_IMAGES = 2.5  # num_images is uniform in 1..4


def unet_s(images: int) -> float:
    return UNET_FIXED_S + UNET_PER_IMAGE_S * images


def static(arrivals: list, config: dict) -> list[tuple[float, dict]]:
    """(latency, body) per request: FIFO, `minWorkers` workers; a free worker takes the first
    waiting request and up to batchSize - 1 more arriving within maxBatchDelay; each
    (scheduler, steps, eta) group of the batch runs its loop in turn, all answered at the end."""
    free = [0.0] * config["minWorkers"]
    size, delay = config["batchSize"], config["maxBatchDelay"] / 1000
    out, i = [], 0
    while i < len(arrivals):
        worker = free.index(min(free))
        begin = max(free[worker], arrivals[i][0])
        j = i + 1
        while j < len(arrivals) and j - i < size and arrivals[j][0] <= begin + delay:
            j += 1
        batch = arrivals[i:j]
        t = max(begin, batch[-1][0]) if len(batch) == size else begin + delay
        groups: dict[tuple, list] = {}
        for _, body in batch:
            groups.setdefault((body["scheduler"], body["steps"], body.get("eta")), []).append(body)
        for group in groups.values():
            t += group[0]["steps"] * (unet_s(sum(b["num_images"] for b in group)) + PER_REQUEST_S * len(group))
        t += ROUND_TRIP_S
        out += [(t - arrived, body) for arrived, body in batch]
        free[worker] = t
        i = j
    return out


def split(flights: list[dict], policy: str, lanes: int) -> list[list[dict]]:
    if policy == "images":  # balanced by image count, in arrival order
        order, weight = flights, lambda f: f["images"]
    elif policy == "work":  # by remaining work, the most first (handlers/ddpm.py lane_members)
        order = sorted(flights, key=lambda f: -f["images"] * f["left"])
        weight = lambda f: f["images"] * f["left"]  # noqa: E731
    else:  # "oldest": the oldest request alone in one lane, the rest in the other
        order = sorted(flights, key=lambda f: f["arrived"])
        return [lane for lane in (order[:1], order[1:]) if lane]
    out, load = [[] for _ in range(lanes)], [0] * lanes
    for f in order:
        k = load.index(min(load))
        out[k].append(f)
        load[k] += weight(f)
    return [lane for lane in out if lane]


def step_level(arrivals: list, config: dict, policy: str = "work", coupled: bool = False) -> list[tuple[float, dict]]:
    """(latency, body) per request under continuous batching: arrivals join at a call's start
    (up to batchSize in flight); each lane steps its own requests for one slice, which ends when
    a request finishes (the other lane ends its current step); `coupled`: all lanes step together."""
    size, slice_s = config["batchSize"], config["handler"]["step_slice_ms"] / 1000
    lanes_n, idle_wait = config["handler"]["unet_lanes"], config["maxBatchDelay"] / 1000
    pending, flights, out, t = list(arrivals), [], [], 0.0
    while pending or flights:
        if not flights:
            t = max(t, pending[0][0]) + idle_wait
        while pending and pending[0][0] <= t and len(flights) < size:
            arrived, body = pending.pop(0)
            flights.append({"arrived": arrived, "body": body, "images": body["num_images"], "left": body["steps"]})
        lanes = split(flights, policy, lanes_n)
        cost = [unet_s(sum(f["images"] for f in lane)) + PER_REQUEST_S * len(lane) for lane in lanes]
        start = t
        if coupled:
            while True:
                t += max(cost)
                for f in flights:
                    f["left"] -= 1
                if any(f["left"] == 0 for f in flights) or t - start >= slice_s:
                    break
        else:
            clock, stop = [start] * len(lanes), None
            running = set(range(len(lanes)))
            while running:
                k = min(running, key=lambda k: clock[k] + cost[k])
                clock[k] += cost[k]
                for f in lanes[k]:
                    f["left"] -= 1
                if stop is None and (any(f["left"] == 0 for f in lanes[k]) or clock[k] - start >= slice_s):
                    stop = clock[k]
                if stop is not None and clock[k] >= stop:
                    running.discard(k)
            t = max(clock)
        t += ROUND_TRIP_S
        out += [(t - f["arrived"], f["body"]) for f in flights if f["left"] <= 0]
        flights = [f for f in flights if f["left"] > 0]
    return out


def p95(latencies: list[tuple[float, dict]]) -> float:
    return percentile([lat for lat, _ in latencies], 0.95)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default=str(SEED), help="arrival sequences, comma-separated (the benchmark's: %(default)s)")
    parser.add_argument("--capacity", type=float, default=46.7,
                        help="static capacity in images/s the rates are shares of (a measured figure)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = configs()
    variants = {"step, lanes by remaining work (shipped)": lambda a: step_level(a, cfg["ddpm_step"]),
                "step, lanes by images, coupled": lambda a: step_level(a, cfg["ddpm_step"], "images", coupled=True),
                "step, oldest request alone in a lane": lambda a: step_level(a, cfg["ddpm_step"], "oldest")}
    print(f"p95 latency (s) / step over static, median over seeds {seeds}, 120 requests each")
    for share in UTILISATIONS:
        rate = share * args.capacity / MEAN_IMAGES
        runs = [workload(120, rate, seed) for seed in seeds]
        base = statistics.median(p95(static(a, cfg["ddpm_static"])) for a in runs)
        print(f"{share:.0%}: static {base:.2f}")
        for name, run in variants.items():
            value = statistics.median(p95(run(a)) for a in runs)
            print(f"    {name}: {value:.2f} ({value / base:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

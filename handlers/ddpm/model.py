"""TorchServe handler for the `ddpm` model: unconditional DDPM / DDIM sampling with diffusers.

The archive holds a diffusers DDPM pipeline directory (unet/ + scheduler/); image size and
channels come from the UNet config, the beta schedule from the scheduler config. Requests of one
TorchServe batch that share (scheduler, steps, eta) run as ONE batched denoising loop; every
request has its own torch.Generator for its initial noise and the per-step noise, so a seeded
request gives the same image alone or inside a batch.

Step-level (continuous) batching, when the model config says `continuousBatching: true`: each
handle() call runs denoising steps of every request in flight, whatever its steps, scheduler and
eta, for one time slice (`step_slice_ms`: at least one step; the slice ends early when a request
finishes). Each request keeps its own sample, scheduler instance and generator in `self.flights` (keyed
by TorchServe's request id: the worker sends unfinished requests back with an empty body, at
other indexes); new requests join at the next step, finished ones are answered at once (see
`step_batch`).
"""
from __future__ import annotations

import base64
import inspect
import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from handlers.adapter.torchserve import (JSON_TYPE, PNG_TYPE, BatchedHandler, Group, Outcome, Pending, streaming)
from handlers.ddpm.request import SCHEDULERS, DdpmRequest
from handlers.core.errors import RequestError, set_error_status
from handlers.core.streaming import (BatchStreams, NDJSON_TYPE, ndjson, preview_event, progress_event, seconds_per_call,
                                wants_preview)
from handlers.core.images import b64_png, encode_png, tensor_to_pil
from handlers.core.torchscript import FrozenUNet

logger = logging.getLogger(__name__)

TRAJECTORY_FRAMES = 10


class DdpmHandler(BatchedHandler):
    """Batched DDPM / DDIM sampling with per-request seeds and a time budget per batch; under
    `continuousBatching: true`, denoising steps of every request in flight for one time slice
    per call."""

    request_type = DdpmRequest

    def initialize(self, context):
        wdir = self.prepare(context)
        try:
            self.unet = self.load_unet(wdir)
            self.scheduler_config = DDPMScheduler.load_config(wdir, subfolder="scheduler")
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"ddpm: cannot load the diffusers DDPM directory {wdir}: {exc}") from exc
        self.unet.to(self.device).eval()
        size = self.unet.config.sample_size  # an int, or (height, width) for non-square models
        self.shape = (self.unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
        # The UNet call every path makes: (sample, timestep) -> noise prediction.
        if self.config["torchscript"]:
            self.denoise = FrozenUNet(self.unet, torch.zeros((1, *self.shape), device=self.device, dtype=self.dtype))
        else:
            self.denoise = lambda x, t: self.unet(x, t).sample
        train_steps = int(self.scheduler_config["num_train_timesteps"])
        self.bind_request({"max_steps": min(int(self.config["max_steps"]), train_steps)})
        self.start_clock(self.measure_image_step())
        # Step-level batching: TorchServe's continuous batching hands every unfinished request
        # back at each call; state of the requests in flight, by request id.
        self.step_level = bool(context.model_yaml_config.get("continuousBatching"))
        # Steps per handle() call: one call's frontend round trip per slice, not per step.
        self.step_slice_s = float(self.config["step_slice_ms"]) / 1000 if self.step_level else 0.0
        # UNet calls of one step in parallel Python threads (torch releases the GIL), each on its
        # own requests with one intra-op thread: the worker's cores without OpenMP's spinning
        # barriers, which collapse when another process holds a core (README "Step-level batching").
        self.lane_count = int(self.config["unet_lanes"]) if self.step_level else 1
        self.lanes = ThreadPoolExecutor(self.lane_count, thread_name_prefix="unet-lane") if self.lane_count > 1 else None
        self.flights: dict[str, SimpleNamespace] = {}
        self.initialized = True
        logger.info("ddpm: %s images, %s schedule, budget %.0f image-steps per batch on %s",
                    self.shape, self.scheduler_config.get("beta_schedule"), self.budget, self.device)

    def load_unet(self, wdir: str) -> UNet2DModel:
        return UNet2DModel.from_pretrained(wdir, subfolder="unet", torch_dtype=self.dtype)

    def measure_image_step(self) -> float:
        """Seconds of one UNet call on one image: the time budget's unit, measured at load."""
        x = torch.zeros((1, *self.shape), device=self.device, dtype=self.dtype)
        t = torch.tensor([500], device=self.device)
        with torch.inference_mode():
            return seconds_per_call(lambda: self.denoise(x, t))

    def capabilities(self) -> dict:
        return {"schedulers": list(SCHEDULERS), "image_shape": list(self.shape),
                "step_level_batching": self.step_level}

    def handle(self, data, context):
        # ts sends a stream chunk when stopping_criteria is set: only step_batch sets it, per call.
        context.stopping_criteria = None
        continuous = self.step_level and getattr(context, "request_ids", None) is not None
        if continuous and not getattr(self, "kserve_protocol", None):
            self.context = context
            if not self._is_describe():
                return self.step_batch(data)
        # Static batching: in-process callers without request ids (nothing would bring a request
        # back) and KServe envelopes. Under continuousBatching too: every answer is then final
        # (stopping_criteria None = an ordinary response).
        return super().handle(data, context)

    # inference ----------------------------------------------------------------------------
    def start(self, name: str, steps: int, eta: float | None, generators: list) -> tuple:
        """What a denoising loop starts from, for the static and the step-level path alike: a fresh
        scheduler with its timesteps, the initial noise of each generator's image, the arguments
        its step() takes, and the step indexes whose x0 estimate a trajectory keeps."""
        scheduler = SCHEDULERS[name].from_config(self.scheduler_config)
        # Timesteps stay on the CPU, as in diffusers' DDPMPipeline: step() indexes the scheduler's
        # CPU tables with them; the UNet moves t to its own device.
        scheduler.set_timesteps(steps)
        x = randn_tensor((len(generators), *self.shape), generator=generators, device=self.device, dtype=self.dtype)
        x = x * scheduler.init_noise_sigma
        # As diffusers' pipelines do: pass a step() only the arguments it takes (UniPC takes no
        # generator, only DDIM an eta).
        accepted = inspect.signature(scheduler.step).parameters
        step_kwargs = {"generator": generators} if "generator" in accepted else {}
        if eta is not None:
            step_kwargs["eta"] = eta
        keep = set(torch.linspace(0, len(scheduler.timesteps) - 1, TRAJECTORY_FRAMES).round().int().tolist())
        return scheduler, x, step_kwargs, keep

    def run_group(self, group: Group) -> list[tuple]:
        """One denoising loop for the whole group: per image, (PIL image, x0 frames or None)."""
        shared = group.shared
        generators = group.generators()
        scheduler, x, step_kwargs, keep = self.start(shared["scheduler"], shared["steps"], shared["eta"], generators)
        wanted = group.per_image("trajectory")
        watch = [i for i in group.first_images() if wanted[i]]
        frames: dict[int, list] = {i: [] for i in watch}
        started = tick = time.monotonic()
        for k, t in enumerate(scheduler.timesteps):
            with torch.inference_mode():
                eps = self.denoise(scheduler.scale_model_input(x, t), t)
            if watch and k in keep:
                x0 = predicted_x0(scheduler, x, eps, t)
                for i in watch:
                    frames[i].append(x0[i : i + 1].float())
            previews = lambda ids, x=x, eps=eps, t=t: x0_images(predicted_x0(scheduler, x[ids], eps[ids], t))  # noqa: E731
            x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
            self.progress(group, k + 1, started, previews)
            if time.monotonic() - tick > 10:
                logger.info("ddpm: step %d/%d for %d images", k + 1, len(scheduler.timesteps), len(generators))
                tick = time.monotonic()
        pils = x0_images(x)
        return [(pil, frames.get(i)) for i, pil in enumerate(pils)]

    # step-level batching ------------------------------------------------------------------
    def step_batch(self, data: list) -> list:
        """One call of TorchServe's continuous batching: admit the new requests, then run steps
        of every request in flight (one UNet call over all their images, each at its own
        timestep, then each request's own scheduler.step) until `step_slice_s` has passed or a
        request has finished, and return one message per request: b"" (the request stays,
        `stopping_criteria` False) until its last step, then its full response body (True; None
        when it ends in its first call, so TorchServe sends an ordinary response)."""
        ctx = self.context
        ids = [ctx.request_ids[i] for i in range(len(data))]
        for gone in set(self.flights) - set(ids):  # the frontend dropped it (client closed)
            del self.flights[gone]
        outcomes: list[Outcome | None] = [None] * len(data)
        new = set()
        for idx, (rid, row) in enumerate(zip(ids, data)):
            if rid in self.flights:
                continue
            new.add(idx)
            try:
                self.flights[rid] = self.take_off(self.admit(idx, row))
            except RequestError as err:
                outcomes[idx] = Outcome(error=err)
            except Exception as exc:  # noqa: BLE001 - one failing request must not fail the others
                logger.exception("ddpm: admitting request %s failed", rid)
                outcomes[idx] = Outcome(error=RequestError(None, f"internal error: {type(exc).__name__}: {exc}", 500))
        active = [(idx, self.flights[rid]) for idx, rid in enumerate(ids) if rid in self.flights]
        flights = [f for _, f in active]
        try:
            if flights:
                self.run_lanes(flights)
        except Exception as exc:  # noqa: BLE001 - reported to every request of this step
            logger.exception("ddpm: step of %d requests failed", len(active))
            err = RequestError(None, f"internal error: {type(exc).__name__}: {exc}", status=500)
            for idx, f in active:
                outcomes[idx] = Outcome(error=err)
                f.done = True
        out, stops = [], []
        for idx, rid in enumerate(ids):
            f = self.flights.get(rid)
            live = f is not None and streaming(f.pending.params)
            if idx in new:  # status, content type and headers go out with a request's first message
                ctx.set_response_header(idx, "X-Batch-Size", str(len(data)))
                if outcomes[idx] is None and f is not None:
                    ctx.set_response_content_type(idx, NDJSON_TYPE if live else PNG_TYPE if f.png_response else JSON_TYPE)
            if outcomes[idx] is None and f is not None and f.done:
                results = [(pil, f.frames.get(i)) for i, pil in enumerate(self.finish(f))]
                outcomes[idx] = self.respond(f.pending, results)
            if f is not None and (f.done or outcomes[idx] is not None):
                del self.flights[rid]
            oc = outcomes[idx]
            if oc is None:  # still denoising: a streaming request's events, else nothing (b"" writes nothing)
                out.append(self.flight_events(f) if live else b"")
                stops.append(False)
                continue
            if live:  # the last step's progress, then the result (or an error event)
                out.append((self.flight_events(f) if oc.error is None else b"") + BatchStreams.last_chunk(oc))
            else:
                if idx in new:
                    for key, value in oc.headers.items():
                        ctx.set_response_header(idx, key, value)
                    if oc.error is not None:
                        set_error_status(ctx, idx, oc.error)
                    ctx.set_response_content_type(idx, JSON_TYPE if oc.error is not None else oc.content_type)
                # After its first message a request's status is fixed (200): a later error goes in-band.
                body = oc.error.body() if oc.error is not None else oc.response
                out.append(body if isinstance(body, (bytes, bytearray)) else json.dumps(body))
            stops.append(None if idx in new else True)
        ctx.stopping_criteria = [lambda _ret, stop=stop: stop for stop in stops]
        return out

    @staticmethod
    def flight_events(f: SimpleNamespace) -> bytes:
        """A streaming request's message of this call: the events of its steps in the call."""
        events, f.events = f.events, []
        return ndjson(events)

    def take_off(self, pending: Pending) -> SimpleNamespace:
        """A request's own sampling state, set up exactly as run_group sets up a group of one."""
        req = pending.params
        generators = Group(shared=req.shared(), requests=[pending]).generators()
        scheduler, x, step_kwargs, keep = self.start(req.scheduler, req.steps, req.eta, generators)
        return SimpleNamespace(pending=pending, scheduler=scheduler, x=x, k=0, step_kwargs=step_kwargs,
                               keep=keep if req.trajectory else set(), frames={0: []} if req.trajectory else {},
                               png_response=pending.png and not req.trajectory, done=False,
                               started=time.monotonic(), events=[])

    def run_lanes(self, flights: list[SimpleNamespace]) -> None:
        """Steps of every flight for one time slice: the flights split over the lanes, each lane
        stepping its own flights on its own thread at its own pace (one lane's long request does
        not wait for the other lane's bigger batch), at least one step each, until the slice has
        passed or a request of either lane has finished (it is answered at once)."""
        sliced = time.monotonic()
        stop = threading.Event()

        def run(lane: list[SimpleNamespace]) -> None:
            try:
                while True:
                    self.step_flights(lane)
                    if any(f.done for f in lane) or time.monotonic() - sliced >= self.step_slice_s:
                        stop.set()
                    if stop.is_set():
                        return
            finally:
                stop.set()  # an error in one lane ends the other's slice too

        lanes = self.lane_members(flights)
        if len(lanes) == 1:
            run(flights)
            return
        for future in [self.lanes.submit(run, [flights[i] for i in members]) for members in lanes]:
            future.result()

    def step_flights(self, flights: list[SimpleNamespace]) -> None:
        """One denoising step of these flights: one UNet call on all their images, each at its own
        timestep (a (B,) tensor), then each flight's own scheduler.step with its own generators."""
        ts = [f.scheduler.timesteps[f.k] for f in flights]
        # As run_group: scale_model_input outside inference mode, the UNet inside it.
        inputs = torch.cat([f.scheduler.scale_model_input(f.x, t) for f, t in zip(flights, ts)])
        tvec = torch.cat([t.reshape(1).expand(len(f.x)).float() for f, t in zip(flights, ts)]).to(self.device)
        with torch.inference_mode():
            eps_all = self.denoise(inputs, tvec)
        start = 0
        for f, t in zip(flights, ts):
            eps = eps_all[start : start + len(f.x)]
            start += len(f.x)
            if f.k in f.keep:
                f.frames[0].append(predicted_x0(f.scheduler, f.x, eps, t)[0:1].float())
            params, total = f.pending.params, len(f.scheduler.timesteps)
            preview = (x0_images(predicted_x0(f.scheduler, f.x, eps, t))
                       if streaming(params) and wants_preview(params, f.k + 1, total) else None)
            f.x = f.scheduler.step(eps, t, f.x, **f.step_kwargs).prev_sample
            f.k += 1
            f.done = f.k == total
            if streaming(params):  # this step's progress, and its preview when due
                elapsed = time.monotonic() - f.started
                f.events.append(progress_event(f.k, total, elapsed, elapsed))
                if preview is not None:
                    f.events.append(preview_event(f.k, total, preview))

    def lane_members(self, flights: list[SimpleNamespace]) -> list[list[int]]:
        """Flight indexes per lane, balanced by remaining work (images x steps left): the
        flights with the most work first, each to the lane with the least work so far, so a long
        request shares its lane with as little as the mix allows; one lane with one flight."""
        n = min(self.lane_count, len(flights))
        lanes: list[list[int]] = [[] for _ in range(n)]
        work = [0] * n
        left = [len(f.x) * (len(f.scheduler.timesteps) - f.k) for f in flights]
        for i in sorted(range(len(flights)), key=lambda i: -left[i]):
            lane = work.index(min(work))
            lanes[lane].append(i)
            work[lane] += left[i]
        return [sorted(members) for members in lanes]

    @staticmethod
    def finish(f: SimpleNamespace) -> list:
        return x0_images(f.x)

    # postprocess --------------------------------------------------------------------------
    def respond(self, pending: Pending, results: list[tuple]) -> Outcome:
        req = pending.params
        pils = [pil for pil, _ in results]
        if pending.png and not req.trajectory:
            return Outcome(response=encode_png(pils[0]), content_type=PNG_TYPE)
        body = {"images": [b64_png(p) for p in pils], "seed": req.seed, "steps": req.steps,
                "scheduler": req.scheduler}
        if req.scheduler == "ddim":
            body["eta"] = req.eta
        if req.trajectory:
            body["trajectory"] = self.trajectory_gif(results[0][1])
        return Outcome(response=body)

    @staticmethod
    def trajectory_gif(frames: list[torch.Tensor]) -> str:
        """The x0 estimates along the reverse process as an animated GIF (base64)."""
        pils = [x0_images(f)[0] for f in frames]
        scale = max(1, 128 // pils[0].width)  # tiny demo images: make the animation visible
        pils = [p.resize((p.width * scale, p.height * scale), resample=0) for p in pils]
        buf = io.BytesIO()
        pils[0].save(buf, format="GIF", save_all=True, append_images=pils[1:], duration=250, loop=0)
        return base64.b64encode(buf.getvalue()).decode("ascii")


def x0_images(x: torch.Tensor) -> list:
    """Samples in [-1, 1] -> PIL images."""
    return tensor_to_pil((x.float() / 2 + 0.5).clamp(0, 1))


def predicted_x0(scheduler, x: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """The clean image the model predicts at timestep t (for the trajectory): from the sample in
    the scheduler's own space (sigma space for Euler, VP space for the others) and the noise."""
    if isinstance(scheduler, EulerDiscreteScheduler):  # x = x0 + sigma * eps
        return x - scheduler.sigmas[scheduler.index_for_timestep(t)] * eps
    alpha_bar = scheduler.alphas_cumprod[int(t)]
    return (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()

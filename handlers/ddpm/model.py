"""The `ddpm` model: unconditional DDPM / DDIM sampling with diffusers.

The archive holds a diffusers DDPM pipeline directory (unet/ + scheduler/); image size and
channels come from the UNet config, the beta schedule from the scheduler config. Requests of one
TorchServe batch that share (scheduler, steps, eta) run as ONE batched denoising loop; every
request has its own torch.Generator for its initial noise and the per-step noise, so a seeded
request gives the same image alone or inside a batch.

Step-level (continuous) batching, when the model config says `continuousBatching: true`
(handlers/core/loops.py StepLoop): each call runs denoising steps of every request in flight,
whatever its steps, scheduler and eta, for one time slice (`step_slice_ms`: at least one step;
the slice ends early when a request finishes). Each request keeps its own sample, scheduler
instance and generator in its flight (`take_off`); new requests join at the next step, finished
ones are answered at once.
"""
from __future__ import annotations

import base64
import inspect
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from handlers.core import provenance
from handlers.core.batch import PNG_TYPE, Group, Outcome, Pending, group_of
from handlers.core.budget import seconds_per_call, streaming
from handlers.core.estimates import predicted_x0
from handlers.core.images import b64_png, encode_png, tensor_to_pil
from handlers.core.model import ServedModel
from handlers.core.precision import run_unet_in, unet_dtype
from handlers.core.streaming import preview_event, progress_event, wants_preview
from handlers.core.torchscript import FrozenUNet
from handlers.ddpm.request import A1111_SAMPLERS, SCHEDULERS, DdpmRequest

logger = logging.getLogger(__name__)

TRAJECTORY_FRAMES = 10


class DdpmModel(ServedModel):
    """Batched DDPM / DDIM sampling with per-request seeds and a time budget per batch; under
    `continuousBatching: true`, denoising steps of every request in flight for one time slice
    per call."""

    request_type = DdpmRequest
    can_step = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        wdir = self.weights
        try:
            self.unet = self.load_unet(wdir)
            self.scheduler_config = DDPMScheduler.load_config(wdir, subfolder="scheduler")
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"ddpm: cannot load the diffusers DDPM directory {wdir}: {exc}") from exc
        self.unet.to(self.device).eval()
        run_unet_in(self.unet, unet_dtype(self.config, self.device, self.dtype), self.dtype)
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
        self.stepping = False
        logger.info("ddpm: %s images, %s schedule, budget %.0f image-steps per batch on %s",
                    self.shape, self.scheduler_config.get("beta_schedule"), self.budget.units, self.device)

    def start_stepping(self) -> None:
        """Step-level batching's settings (handlers/core/loops.py StepLoop calls it)."""
        # Steps per call: one call's server round trip per slice, not per step.
        self.step_slice_s = float(self.config["step_slice_ms"]) / 1000
        # UNet calls of one step in parallel Python threads (torch releases the GIL), each on its
        # own requests with one intra-op thread: the worker's cores without OpenMP's spinning
        # barriers, which collapse when another process holds a core (docs/step-level-batching.md).
        self.lane_count = int(self.config["unet_lanes"])
        self.lanes = ThreadPoolExecutor(self.lane_count, thread_name_prefix="unet-lane") if self.lane_count > 1 else None
        self.stepping = True

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
                "step_level_batching": self.stepping}

    def png_ok(self, params: DdpmRequest) -> bool:
        return super().png_ok(params) and not params.trajectory

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

    def run_group(self, group: Group, progress) -> list[tuple]:
        """One denoising loop for the whole group: per image, (PIL image, x0 frames or None). A
        request cancelled meanwhile leaves the loop at that step (None for its images); one whose
        deadline passed leaves it with its x0 estimate of that step."""
        shared = group.shared
        generators = group.generators()
        scheduler, x, step_kwargs, keep = self.start(shared["scheduler"], shared["steps"], shared["eta"], generators)
        owner = [p.idx for p in group.requests for _ in range(p.params.images_requested)]
        rows = list(range(len(owner)))  # the image of each row of x
        results: list = [None] * len(owner)
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
                    if i in rows:
                        frames[i].append(x0[rows.index(i)][None].float())
            previews = lambda ids, x=x, eps=eps, t=t, at=list(rows): x0_images(  # noqa: E731
                predicted_x0(scheduler, x[[at.index(i) for i in ids]], eps[[at.index(i) for i in ids]], t))
            before = x
            x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
            progress(group, k + 1, started, previews)
            ended = [r for r, i in enumerate(rows) if owner[i] in group.cancelled or owner[i] in group.stopped]
            if ended:
                out = [r for r in ended if owner[rows[r]] in group.stopped]
                if out:  # past their deadline: their x0 estimate of this step is their answer
                    for r, pil in zip(out, x0_images(predicted_x0(scheduler, before[out], eps[out], t))):
                        results[rows[r]] = (pil, frames.get(rows[r]))
                stay = [r for r in range(len(rows)) if r not in ended]
                x, rows, generators = x[stay], [rows[r] for r in stay], [generators[r] for r in stay]
                if "generator" in step_kwargs:
                    step_kwargs["generator"] = generators
                if not rows:
                    break
            if time.monotonic() - tick > 10:
                logger.info("ddpm: step %d/%d for %d images", k + 1, len(scheduler.timesteps), len(rows))
                tick = time.monotonic()
        for i, pil in zip(rows, x0_images(x) if rows else []):
            results[i] = (pil, frames.get(i))
        return results

    # step-level batching ------------------------------------------------------------------
    def take_off(self, pending: Pending, watch=None) -> SimpleNamespace:
        """A request's own sampling state, set up exactly as run_group sets up a group of one.
        `watch(step, total) -> bool`, called after each step, records its progress and says
        whether it was cancelled (it then ends at that step, `cancelled_at`). Past its `deadline_s`
        it lands with its x0 estimate of that step (`stopped_at`)."""
        req = pending.params
        generators = group_of(pending).generators()
        scheduler, x, step_kwargs, keep = self.start(req.scheduler, req.steps, req.eta, generators)
        # A streamed request's first event is step 0, sent on admission as the static path sends it.
        events = [progress_event(0, len(scheduler.timesteps), 0.0, 0.0)] if streaming(req) else []
        return SimpleNamespace(pending=pending, scheduler=scheduler, x=x, k=0, step_kwargs=step_kwargs,
                               keep=keep if req.trajectory else set(), frames={0: []} if req.trajectory else {},
                               done=False, started=time.monotonic(), events=events, watch=watch, cancelled_at=None,
                               deadline=None if req.deadline_s is None else pending.admitted + req.deadline_s,
                               stopped_at=None)

    def run_slice(self, flights: list[SimpleNamespace]) -> None:
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
            before = f.x
            f.x = f.scheduler.step(eps, t, f.x, **f.step_kwargs).prev_sample
            f.k += 1
            f.done = f.k == total
            if not f.done and f.watch is not None and f.watch(f.k, total):
                f.done, f.cancelled_at = True, f.k
            elif not f.done and f.deadline is not None and time.monotonic() >= f.deadline:
                # past its deadline: it lands with its x0 estimate of this step
                f.done, f.stopped_at, f.x = True, f.k, predicted_x0(f.scheduler, before, eps, t)
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
    def land(f: SimpleNamespace) -> list[tuple]:
        """A finished flight's results, as run_group gives them."""
        return [(pil, f.frames.get(i)) for i, pil in enumerate(x0_images(f.x))]

    # postprocess --------------------------------------------------------------------------
    def respond(self, pending: Pending, results: list[tuple]) -> Outcome:
        req = pending.params
        pils = [pil for pil, _ in results]
        infos = self.png_infos(req, len(pils))
        if pending.png:
            return Outcome(response=encode_png(pils[0], pnginfo=infos[0]), content_type=PNG_TYPE)
        body = {"images": [b64_png(p, pnginfo=info) for p, info in zip(pils, infos)], "seed": req.seed,
                "steps": req.steps, "scheduler": req.scheduler, "request_id": req.request_id}
        if req.scheduler == "ddim":
            body["eta"] = req.eta
        if req.trajectory:
            body["trajectory"] = self.trajectory_gif(results[0][1])
        return Outcome(response=body)

    def a1111_parameters(self, params: DdpmRequest) -> str:
        """No prompt: the first line is empty, the settings line follows."""
        return provenance.a1111_parameters("", "", {
            "Steps": params.steps, "Sampler": A1111_SAMPLERS[params.scheduler], "Eta": params.eta,
            "Seed": params.seed, "Size": f"{self.shape[2]}x{self.shape[1]}",
            "Model hash": provenance.model_hash(self.archive), "Model": self.archive.get("model")})

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


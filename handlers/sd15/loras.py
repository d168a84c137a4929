"""LoRAs per request for `sd15`: the folder of LoRA files a target's yaml names (`lora_dir`), what
each file holds (read from its safetensors header: no tensor is loaded to list it), and the
adapters loaded into the pipeline's UNet and text encoder through diffusers' PEFT backend, kept
within `lora_cache_mb` (the least recently used one is unloaded first).

Adapters are applied unfused (peft adds each LoRA's low-rank product to its layer's output): a
group switches its set with `set_adapters` without touching the base weights, so a request
without LoRAs runs the base model's exact numbers (`disable_lora`), and so does a LoRA at scale 0.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace

from safetensors import SafetensorError, safe_open

from handlers.core.errors import RequestError

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")  # weights/single_file.py refuses them too
MIB = 2**20


@dataclass(frozen=True)
class LoraFile:
    """One file of the folder: its format and size, or why it cannot be used (`error`)."""

    name: str
    path: str
    stamp: tuple[int, int]  # (size, mtime_ns): a changed file is read (and reloaded) again
    format: str | None = None  # "kohya" (A1111 / ComfyUI downloads) or "diffusers" (PEFT keys)
    parameters: int = 0  # LoRA weights (alphas are scalars, folded into the scale)
    error: str | None = None

    def loaded_bytes(self, itemsize: int) -> int:
        """Memory the adapter takes once loaded in the pipeline's dtype."""
        return self.parameters * itemsize


def lora_format(keys: list[str]) -> tuple[str | None, str | None]:
    """(format, None) for the LoRA layouts diffusers loads for SD1.5, else (None, what it is)."""
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
        return None, "an SDXL LoRA (two text encoders); this model is SD1.5"
    if any(k.startswith(("lora_unet_", "lora_te_")) and ".lora_down." in k for k in keys):
        return "kohya", None
    if any(k.startswith(("unet.", "text_encoder.")) and (".lora_A." in k or ".lora.down." in k or ".lora_linear_layer." in k)
           for k in keys):
        return "diffusers", None
    if any(".hada_w1" in k or ".lokr_w1" in k for k in keys):
        return None, "a LyCORIS LoHa/LoKr file; diffusers loads LoRA (lora_down/lora_up) files only"
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys):
        return None, "a whole checkpoint, not a LoRA (archive it as the model: docs/your-own-sd.md)"
    return None, "no LoRA keys (expected kohya 'lora_unet_*.lora_down.weight' or diffusers 'unet.*.lora_A.weight')"


def read_lora(name: str, path: str, stamp: tuple[int, int]) -> LoraFile:
    """The file's header only: its keys decide the format, its shapes the parameter count."""
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            shapes = {k: f.get_slice(k).get_shape() for k in keys}
    except (SafetensorError, OSError, ValueError) as exc:
        return LoraFile(name, path, stamp, error=f"not a readable safetensors file ({exc})")
    fmt, error = lora_format(keys)
    if error:
        return LoraFile(name, path, stamp, error=error)
    count = 0
    for key, shape in shapes.items():
        if not key.endswith(".alpha"):
            n = 1
            for d in shape:
                n *= d
            count += n
    return LoraFile(name, path, stamp, format=fmt, parameters=count)


def a1111_hash(path: str) -> str:
    """AUTOMATIC1111's short hash of a LoRA file ("Lora hashes" in its infotext): the first 12 hex of
    sha256 over the tensor bytes after the safetensors header (its `addnet_hash_safetensors`), so
    tools that look LoRAs up by that hash find the same file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        f.seek(8 + header)
        for chunk in iter(lambda: f.read(MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


class LoraLibrary:
    """The LoRA files of one folder, and which of them are loaded into one pipeline."""

    def __init__(self, folder: str, budget_mb: float, itemsize: int):
        self.folder = folder
        self.budget = int(budget_mb * MIB)
        self.itemsize = itemsize
        self._files: dict[str, LoraFile] = {}
        self._hashes: dict[tuple[str, tuple[int, int]], str] = {}
        self.loaded: OrderedDict[str, LoraFile] = OrderedDict()  # least recently used first
        self._enabled = True

    # the folder --------------------------------------------------------------------------
    def scan(self) -> dict[str, LoraFile]:
        """Every `*.safetensors` of the folder by name (file stem); a file is read again only when
        its size or mtime changed (so a file whose load failed stays refused until it changes).
        Pickled files are listed as refused."""
        files: dict[str, LoraFile] = {}
        try:
            entries = sorted(os.scandir(self.folder), key=lambda e: e.name)
        except FileNotFoundError:
            entries = []
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            if not entry.is_file() or suffix.lower() not in (SUFFIX, *PICKLE_SUFFIXES):
                continue
            st = entry.stat()
            stamp = (st.st_size, st.st_mtime_ns)
            if suffix.lower() != SUFFIX:
                files[stem] = LoraFile(stem, entry.path, stamp, error="a pickle: loading it runs code; only "
                                                                      ".safetensors LoRAs are loaded")
                continue
            known = self._files.get(stem)
            files[stem] = known if known is not None and known.stamp == stamp else read_lora(stem, entry.path, stamp)
        self._files = files
        return files

    def usable(self) -> dict[str, int]:
        """name -> the memory it takes loaded, for the LoRAs a request may name (what its validation reads)."""
        return {n: f.loaded_bytes(self.itemsize) for n, f in self.scan().items() if f.error is None}

    def hash_of(self, name: str) -> str | None:
        f = self._files.get(name)
        if f is None or f.error:
            return None
        key = (f.path, f.stamp)
        if key not in self._hashes:
            self._hashes[key] = a1111_hash(f.path)
        return self._hashes[key]

    def describe(self) -> dict:
        files = self.scan()
        return {
            "lora_dir": self.folder,
            "lora_cache_mb": self.budget / MIB,
            "loras": [{"name": f.name, "format": f.format, "size_mb": round(f.loaded_bytes(self.itemsize) / MIB, 3),
                       "loaded": f.name in self.loaded} for f in files.values() if f.error is None],
            "refused_loras": [{"name": f.name, "error": f.error} for f in files.values() if f.error],
        }

    # the pipeline ------------------------------------------------------------------------
    def activate(self, pipe, lora_set: tuple[tuple[str, float], ...]) -> None:
        """Makes `pipe` (and every pipeline sharing its UNet and text encoder) run with exactly
        these LoRAs at these scales; () = the base model."""
        if not lora_set:
            if self.loaded and self._enabled:
                pipe.disable_lora()
                self._enabled = False
            return
        names = [n for n, _ in lora_set]
        files = self.scan()
        for name in names:
            f = files.get(name)
            if f is None or f.error:
                raise RequestError("loras", f"LoRA '{name}' is no longer usable: {f.error if f else 'its file is gone'}")
            self._load(pipe, f, keep=set(names))
        pipe.enable_lora()
        self._enabled = True
        pipe.set_adapters(names, adapter_weights=[s for _, s in lora_set])

    def _load(self, pipe, f: LoraFile, keep: set[str]) -> None:
        held = self.loaded.get(f.name)
        if held is not None and held.stamp == f.stamp:
            self.loaded.move_to_end(f.name)
            return
        if held is not None:  # the file changed on disk: its new weights replace the old
            self._unload(pipe, f.name)
        need = f.loaded_bytes(self.itemsize)
        for victim in [n for n in self.loaded if n not in keep]:
            if self.used() + need <= self.budget:
                break
            self._unload(pipe, victim)
        try:
            with warnings.catch_warnings():  # peft warns that a model holds several adapters: that is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                pipe.load_lora_weights(f.path, adapter_name=f.name)
        except Exception as exc:  # noqa: BLE001 - a file that does not fit this model is the request's error
            if any(f.name in names for names in pipe.get_list_adapters().values()):
                pipe.delete_adapters([f.name])
            why = f"does not fit this model: {str(exc).splitlines()[0][:300]}"
            self._files[f.name] = replace(f, error=why)
            logger.warning("sd15: LoRA %s %s", f.path, why)
            raise RequestError("loras", f"LoRA '{f.name}' {why}") from None
        self.loaded[f.name] = f
        logger.info("sd15: loaded LoRA %s (%s, %.1f MB; %d loaded)", f.name, f.format, need / MIB, len(self.loaded))

    def _unload(self, pipe, name: str) -> None:
        with warnings.catch_warnings():  # peft says which adapter becomes active instead: activate() sets them all
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            pipe.delete_adapters([name])
        del self.loaded[name]
        logger.info("sd15: unloaded LoRA %s (cache budget %.0f MB)", name, self.budget / MIB)

    def used(self) -> int:
        return sum(f.loaded_bytes(self.itemsize) for f in self.loaded.values())

"""DINOv2 image features for fidelity (DINO fidelity of DreamBooth, arXiv:2208.12242; DINOv2 as in LyCORIS, arXiv:2309.14859).

The model is loaded through transformers exactly as a user's would be:
`AutoModel.from_pretrained(name_or_path, cache_dir=...)` and `AutoImageProcessor.from_pretrained(...)`, so
`eval.dino_model` takes a hub id or a local folder written by `save_pretrained` (config.json, the weights,
preprocessor_config.json). An image's feature is the CLS token of the last layer after the final layer norm
(`last_hidden_state[:, 0]`, which is `pooler_output` of `Dinov2Model`), L2-normalised, after the processor's
own resize, centre crop and normalisation.

Default: `facebook/dinov2-base`, 86 M parameters, ~350 MB downloaded once (fp32 `model.safetensors` plus
its configs), 768-d features. The download lands in the `cache_dir` handed to `load_dino` (the Hugging Face
hub cache, ~/.cache/huggingface/hub or $HF_HUB_CACHE, when it is None); after that it loads offline
(HF_HUB_OFFLINE=1). Other sizes: dinov2-small (22 M, 384-d), dinov2-large (304 M, 1024-d), dinov2-giant (1.1 B,
1536-d).

`dino_problem` is the cheap check before launch (no model is built): it says whether `load_dino` will find
the weights, and if not the fix; `load_dino` raises `DinoLoadError` with the same fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

DEFAULT_DINO = "facebook/dinov2-base"
# what `load_dino` reads from a folder or a hub repo (transformers' file names)
CONFIG_FILE = "config.json"
PROCESSOR_FILE = "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
NONE_NAMES = ("", "none", "null")


class DinoLoadError(RuntimeError):
    """The configured DINO weights could not be loaded; the message says how to get them or choose others."""


@dataclass
class Dino:
    """A transformers DINOv2 model (or another ViT-style AutoModel whose first output token is CLS, such as the
    original DINO's facebook/dino-vitb16) and its image processor."""

    model: torch.nn.Module
    processor: object
    name: str

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image], device: torch.device | str, batch: int = 16) -> torch.Tensor:
        """L2-normalised CLS embeddings (N, D), float32 on the CPU.

        The model is moved to `device` for the call and back to where it was afterwards (86 M parameters:
        a fraction of a second on a GPU), so a model kept between trials never counts in a later trial's VRAM.
        """
        if not images:
            return torch.empty(0, self.dim)
        device = torch.device(device)
        home = next(self.model.parameters()).device
        self.model.to(device)
        try:
            out = []
            for i in range(0, len(images), batch):
                chunk = [im.convert("RGB") for im in images[i : i + batch]]
                pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
                dtype = next(self.model.parameters()).dtype
                output = self.model(pixel_values=pixels.to(device=device, dtype=dtype))
                # the CLS token after the final layer norm: Dinov2Model's pooler_output; for a ViTModel (the
                # DINO ViT-S/16 DreamBooth used, facebook/dino-vits16) the raw CLS, not its tanh pooler
                out.append(output.last_hidden_state[:, 0].float().cpu())
        finally:
            self.model.to(home)
        return F.normalize(torch.cat(out), dim=-1)


def _offline() -> bool:
    """HF_HUB_OFFLINE as the hub library and sdsweep's model loading read it."""
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover - transformers depends on it
        pass
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false")


def _looks_like_path(name: str) -> bool:
    """A local folder rather than a hub id: as transformers decides (an existing path), or written as one."""
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _cache_text(cache_dir) -> str:
    if cache_dir is not None:
        return str(Path(cache_dir).expanduser())
    from huggingface_hub import constants

    return f"the Hugging Face cache ({constants.HF_HUB_CACHE})"


def download_command(repo_id: str, cache_dir) -> str:
    """The one-liner that downloads `repo_id` to where `load_dino(repo_id, cache_dir)` looks."""
    args = repr(repo_id) + (f", cache_dir={str(Path(cache_dir).expanduser())!r}" if cache_dir is not None else "")
    return (f'python -c "from transformers import AutoModel, AutoImageProcessor; '
            f'AutoModel.from_pretrained({args}); AutoImageProcessor.from_pretrained({args})"')


def fix_message(name_or_path: str, cache_dir, why: str) -> str:
    """What is wrong with eval.dino_model=`name_or_path`, and every way out."""
    repo = DEFAULT_DINO if _looks_like_path(name_or_path) else name_or_path
    size = "~350 MB" if repo == DEFAULT_DINO else "its weights"
    get = f"run once online `{download_command(repo, cache_dir)}` to download {size} to {_cache_text(cache_dir)}"
    if repo != name_or_path:  # a folder that is not right: the default is the other way
        get = f"fix the folder, or use eval.dino_model={DEFAULT_DINO} and {get}"
    return (f"eval.dino_model={name_or_path}: {why}. Fix: {get}; or set eval.dino_model=<local folder> "
            f"(written by save_pretrained: {CONFIG_FILE}, {WEIGHT_FILES[0]}, {PROCESSOR_FILE}); "
            "or eval.dino_model=none to skip DINO fidelity")


def _folder_problem(folder: Path) -> str | None:
    if not folder.is_dir():
        return f"no such folder ({folder})" if not folder.exists() else f"{folder} is a file, not a model folder"
    missing = [f for f in (CONFIG_FILE, PROCESSOR_FILE) if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        for index in WEIGHT_INDEX_FILES:
            if (folder / index).is_file():
                shards = _shards(folder / index)
                lost = [s for s in shards if not (folder / s).is_file()]
                if shards and not lost:
                    break
                missing += lost or [index]
                break
        else:
            missing.append(" or ".join(WEIGHT_FILES))
    return f"{folder} lacks {', '.join(missing)}" if missing else None


def _shards(index: Path) -> list[str]:
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _hub_problem(repo_id: str, cache_dir) -> str | None:
    """Whether the hub repo's config, processor config and weights are all in the cache."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> str | None:
        try:
            hit = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        except Exception:  # noqa: BLE001 - an id the hub library refuses (HFValidationError)
            return None
        return hit if isinstance(hit, str) else None

    missing = [f for f in (CONFIG_FILE, PROCESSOR_FILE) if cached(f) is None]
    if not any(cached(f) for f in WEIGHT_FILES):
        for index in WEIGHT_INDEX_FILES:
            path = cached(index)
            if path:
                shards = _shards(Path(path))
                if shards and all(cached(s) for s in shards):
                    break
        else:
            missing.append("the weights")
    if not missing:
        return None
    return f"HF_HUB_OFFLINE is set and {repo_id} is not in {_cache_text(cache_dir)} (missing {', '.join(missing)})"


def dino_problem(name_or_path: str | None, cache_dir=None, *, offline: bool | None = None) -> str | None:
    """Before launch, without building a model: why `load_dino(name_or_path, cache_dir)` would fail, with the
    fix (the message DinoLoadError carries), or None when it will load (or `none`: DINO is off).

    A local folder must hold config.json, preprocessor_config.json and the weights. A hub id is looked up in
    the cache when offline (`offline=None` reads HF_HUB_OFFLINE); online, a hub id that is not cached yet is
    not a problem: it is downloaded on first use, like the base model."""
    if name_or_path is None or str(name_or_path).strip().lower() in NONE_NAMES:
        return None
    name = str(name_or_path)
    folder = Path(name).expanduser()
    if _looks_like_path(name):
        why = _folder_problem(folder)
        return fix_message(name, cache_dir, why) if why else None
    if offline is None:
        offline = _offline()
    if not offline:
        return None
    why = _hub_problem(name, cache_dir)
    return fix_message(name, cache_dir, why) if why else None


_DINO_CACHE: dict[tuple[str, str | None], Dino] = {}


def load_dino(name_or_path: str, cache_dir=None) -> Dino:
    """The DINOv2 model `name_or_path` (hub id or local folder) with its image processor, in fp32 on the CPU.

    Cached per process (Hydra runs a whole sweep in one process: the model loads once). Weights that are
    not available (offline and not cached, a bad path, a broken folder) raise DinoLoadError with the fix;
    there is never a silent fallback."""
    cache = str(Path(cache_dir).expanduser()) if cache_dir is not None else None
    key = (str(name_or_path), cache)
    if key in _DINO_CACHE:
        return _DINO_CACHE[key]
    name = str(name_or_path)
    if name.strip().lower() in NONE_NAMES:
        raise DinoLoadError("eval.dino_model=none: DINO fidelity is off, there is no model to load")
    source = str(Path(name).expanduser()) if _looks_like_path(name) else name
    if _looks_like_path(name):
        why = _folder_problem(Path(source))
        if why:
            raise DinoLoadError(fix_message(name, cache_dir, why))
    from transformers import AutoImageProcessor, AutoModel

    try:
        processor = AutoImageProcessor.from_pretrained(source, cache_dir=cache)
        model = AutoModel.from_pretrained(source, cache_dir=cache)
    except Exception as e:  # noqa: BLE001 - network, not cached, bad id, corrupt download: one message with the fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DinoLoadError(fix_message(name, cache_dir, f"could not load it ({type(e).__name__}: {first})")) from e
    model.float().eval().requires_grad_(False)  # fp32 whatever the checkpoint's dtype
    dino = Dino(model, processor, name)
    _DINO_CACHE[key] = dino
    return dino

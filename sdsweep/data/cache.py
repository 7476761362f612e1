"""The feature cache shared by a sweep: VAE latents and text-encoder outputs, computed once.

Most cells of an ablation matrix train different adapters on the same frozen VAE and text
encoders and the same images: the second trial reads what the first computed.

What is cached, and why it never changes what is trained
  * Latents are cached as the VAE's latent *distribution* (mean and log-variance), not as a
    sample: a trial samples from it at each step exactly as `vae.encode(x).latent_dist.sample()`
    would, with the same random draw, so cached and live training see the same latents.
  * One entry per (image, crop, flip): with a centre crop (or images that already have their
    target shape) an image has one crop, and both flips are cached. A random crop of a larger
    image can land anywhere, so caching would have to freeze a few crops (SimpleTuner's
    approach) and train on less variety than asked for: those trials encode latents live
    instead, and say so once in the log; their text is still cached. `latents_cached` states
    the rule, for training and for the memory estimator (sdsweep/sweep/estimate.py) alike.
  * Text-encoder outputs are cached per caption, plus the empty prompt that caption dropout
    trains on. Trials whose text encoders train (`text_encoder=lora`) encode text live (their
    outputs change every step) but still use cached latents.

Content-addressed: an entry's name is a hash of everything that determines it: the frozen
module's class, config and a sample of its weights (so another checkpoint or the fp16-fix VAE
is another namespace), its dtype and autocast, the tokenizers, and for latents the image file
(path, size, mtime) and the exact crop and flip; for text, the caption. Nothing else (adapter,
targets, optimizer, learning rate...) is in the key, so every such trial shares the entries.

Safe to share: entries are written to a temporary file and renamed (readers see the old file,
nothing, or the whole new one); a trial fills a namespace under a file lock, so two trials
starting together encode each entry once (the second waits, then finds everything present).
Checked on read: each entry carries the SHA-256 of its tensor bytes; a missing, truncated or
altered entry is recomputed at set-up, never trusted.

Layout: `cache.dir/{latents,text}/<namespace>/<key[:2]>/<key>.safetensors`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sdsweep.config.schema import trains_text_encoders
from sdsweep.data import toy_world
from sdsweep.data.dataset import CaptionedImages, cover_size
from sdsweep.data.folder import Record
from sdsweep.io import atomic_write_bytes, file_state

log = logging.getLogger(__name__)
CACHE_VERSION = 1
Tensors = dict[str, torch.Tensor]


class CacheError(RuntimeError):
    """A cache entry went bad after set-up verified it (another process altered the cache)."""


# --- entries: safetensors with a checksum ------------------------------------------------------


def _data_region(blob: bytes) -> bytes:
    return blob[8 + int.from_bytes(blob[:8], "little") :]


def encode_entry(tensors: Tensors) -> bytes:
    """safetensors bytes whose metadata holds the SHA-256 of the tensor data region."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    digest = hashlib.sha256(_data_region(st_save(tensors))).hexdigest()
    return st_save(tensors, metadata={"sha256": digest, "sdsweep_cache": str(CACHE_VERSION)})


def decode_entry(blob: bytes) -> Tensors | None:
    """The tensors of an entry, or None if it is truncated, unparsable or fails its checksum."""
    try:
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + header_len])
        digest = header["__metadata__"]["sha256"]
        if hashlib.sha256(_data_region(blob)).hexdigest() != digest:
            return None
        return st_load(blob)
    except Exception:  # noqa: BLE001 - any damage means "recompute"
        return None


class EntryStore:
    """Content-addressed entries under one namespace folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def status(self, key: str) -> str:
        """'ok', 'missing' or 'corrupt' (read and checked in full)."""
        path = self.path(key)
        if not path.exists():
            return "missing"
        try:
            return "ok" if decode_entry(path.read_bytes()) is not None else "corrupt"
        except OSError:
            return "corrupt"

    def read(self, key: str) -> Tensors:
        try:
            tensors = decode_entry(self.path(key).read_bytes())
        except OSError as e:
            raise CacheError(f"cache entry {self.path(key)} is unreadable ({e}): start the trial again") from e
        if tensors is None:
            raise CacheError(f"cache entry {self.path(key)} changed after set-up checked it: start the trial again")
        return tensors

    def write(self, key: str, tensors: Tensors) -> None:
        # write-then-rename: two trials writing the same key leave one whole file, never a mix
        atomic_write_bytes(self.path(key), encode_entry(tensors))

    def lock(self) -> FileLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.folder / ".lock"))


@dataclass
class FillReport:
    entries: int = 0
    hits: int = 0
    computed: int = 0
    corrupt: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def fill(store: EntryStore, wanted: dict[str, Any], compute: Callable[[list[Any]], list[Tensors]],
         batch_size: int, what: str) -> FillReport:
    """Make every key of `wanted` present and valid in `store`, computing what is missing or bad.

    `compute` turns a list of items into one tensor dict per item. Runs under the store's
    lock, so a second trial filling the same namespace waits and then only verifies.
    """
    started = time.perf_counter()
    report = FillReport(entries=len(wanted))
    with held(store.lock(), f"cache: another trial is filling {store.folder}; waiting for it"):
        todo = []
        for key, item in wanted.items():
            status = store.status(key)
            if status == "ok":
                report.hits += 1
                continue
            if status == "corrupt":
                report.corrupt += 1
                log.warning("cache: %s entry %s is corrupt; recomputing it", what, store.path(key))
            todo.append((key, item))
        for chunk in chunks(todo, batch_size):
            for (key, _), tensors in zip(chunk, compute([item for _, item in chunk])):
                store.write(key, tensors)
                report.computed += 1
    report.seconds = time.perf_counter() - started
    return report


@contextmanager
def held(lock: FileLock, waiting: str) -> Iterator[None]:
    """`lock` held for the block; when another process holds it, `waiting` is logged once before waiting."""
    try:
        lock.acquire(timeout=1)
    except TimeoutError:
        log.info("%s", waiting)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --- namespaces: what the frozen modules are ------------------------------------------------------


def _hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode() if not isinstance(part, bytes) else part)
    return h.hexdigest()


def _public_config(module: torch.nn.Module) -> dict:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # paths and library versions say where a model was read from, not what it computes
    return {k: v for k, v in raw.items() if not k.startswith("_") and k != "transformers_version"}


@torch.no_grad()
def module_fingerprint(module: torch.nn.Module) -> str:
    """Class, config and a strided sample of every weight: another checkpoint, another hash.

    Hashing all the weights of SDXL's text encoders would read gigabytes per trial; 64 values
    spread over each tensor tell checkpoints apart just as surely.
    """
    names, samples = [], []
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        names.append((name, list(tensor.shape), str(tensor.dtype)))
        samples.append(flat[:: max(1, flat.numel() // 64)][:64].float())
    values = torch.cat(samples).cpu().numpy().tobytes() if samples else b""
    return _hash(type(module).__name__, _public_config(module), names, values)


def tokenizer_fingerprint(tokenizer) -> str:
    """Vocabulary, merges, normalisation: what maps a caption to ids. Not the fast tokenizer's
    truncation and padding state, which every call with truncation=True/padding= rewrites (a base
    model kept from the previous trial has a used tokenizer; its ids are the same).

    Remembered per tokenizer object, under what can change in a tokenizer after it is loaded (tokens
    added to it: textual inversion adds and removes them; its maximum length; its padding token)."""
    key = (type(tokenizer).__name__, _tokenizer_state(tokenizer))
    remembered = _TOKENIZER_FINGERPRINTS.get(tokenizer)
    if remembered is not None and remembered[0] == key:
        return remembered[1]
    fingerprint = _tokenizer_spec_hash(tokenizer)
    try:
        _TOKENIZER_FINGERPRINTS[tokenizer] = (key, fingerprint)
    except TypeError:  # an object that takes no weak reference: hashed each time (~0.02 s)
        pass
    return fingerprint


_TOKENIZER_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_state(tokenizer) -> tuple:
    added = sorted((str(k), v) for k, v in tokenizer.get_added_vocab().items())
    return len(tokenizer), tuple(added), tokenizer.model_max_length, str(tokenizer.pad_token)


def _tokenizer_spec_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = _spec_without_call_state(backend) if backend is not None else sorted(tokenizer.get_vocab().items())
    return _hash(type(tokenizer).__name__, tokenizer.model_max_length, str(tokenizer.pad_token), spec)


def _spec_without_call_state(backend) -> bytes:
    """The backend tokenizer's own JSON (tokenizers writes its vocabulary and added tokens in id order,
    so equal tokenizers give equal bytes) without its truncation and padding: transformers sets those
    anew on every call, so they are scratch state, cleared for the serialisation and put back. Parsing
    the JSON and writing it again without them took ~0.25 s per CLIP tokenizer; this takes ~0.02 s."""
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        return backend.to_str().encode()
    finally:
        if truncation:
            backend.enable_truncation(**truncation)
        if padding:
            backend.enable_padding(**padding)


def latent_namespace(vae: torch.nn.Module) -> str:
    dtype = next(vae.parameters()).dtype
    return _hash("latents", CACHE_VERSION, module_fingerprint(vae), str(dtype))[:32]


def text_namespace(components, autocast_dtype: torch.dtype | None) -> str:
    encoders = [module_fingerprint(te) for te in components.text_encoders]
    tokenizers = [tokenizer_fingerprint(t) for t in components.tokenizers]
    return _hash("text", CACHE_VERSION, components.family, encoders, tokenizers, str(autocast_dtype),
                 components.extra.get("t5_max_length"))[:32]


# --- the two stores the data set reads from -----------------------------------------------------------


class LatentStore:
    """Cached latent distributions by (image file, crop, flip); picklable for DataLoader workers."""

    def __init__(self, root: Path, namespace: str):
        self.namespace, self.entries = namespace, EntryStore(Path(root) / "latents" / namespace)

    def key(self, record, view) -> str:
        where = list(file_state(Path(record.path)))  # a list, as the key was always hashed: cached entries stay valid
        return _hash(self.namespace, where, list(view.target), list(view.resized), view.top, view.left, view.flip)

    def load(self, record, view) -> torch.Tensor:
        return self.entries.read(self.key(record, view))["latent_dist"]


class TextStore:
    """Cached text-encoder outputs by caption text; picklable for DataLoader workers."""

    def __init__(self, root: Path, namespace: str):
        self.namespace, self.entries = namespace, EntryStore(Path(root) / "text" / namespace)

    def key(self, caption: str) -> str:
        return _hash(self.namespace, caption)

    def load(self, caption: str) -> Tensors:
        return self.entries.read(self.key(caption))


# --- what is cached: one rule for training (prepare) and the memory estimator --------------------------


def latents_cached(cfg, dataset: CaptionedImages | None = None) -> bool | None:
    """Whether a trial trains on cached latents (else its VAE encodes them every step).

    Cached when the cache is on and every image has a single view training can draw (both flips
    are cached): with a centre crop, or when its cover resize already is its target, the square
    or with data.buckets its bucket, so that a random crop has one place to go. `dataset`: the
    trial's images. Without it, from the config alone: the built-in set's images are known
    (drawn in code), a folder's or a Hugging Face dataset's are not, and the answer is None
    when it depends on them (data.crop=random).
    """
    if not cfg.cache.enabled:
        return False
    if cfg.data.crop == "center":
        return True
    if dataset is None:
        dataset = _builtin_geometry(cfg.data)
        if dataset is None:
            return None
    return all(cover_size(r.width, r.height, target) == (target[1], target[0])
               for r, target in zip(dataset.records, dataset.targets))


def text_cached(cfg) -> bool:
    """Whether a trial reads its text-encoder outputs from the cache: not when the encoders train
    (their outputs change every step)."""
    return bool(cfg.cache.enabled and not trains_text_encoders(cfg))


def _builtin_geometry(data_cfg) -> CaptionedImages | None:
    """The built-in set as a training set of its images' sizes, nothing read or written; None for a
    folder or a Hugging Face dataset (load_dataset's order: data.dataset, data.path, built-in)."""
    if data_cfg.dataset or data_cfg.path:
        return None
    return CaptionedImages([Record(Path("builtin"), "", *_builtin_size())], data_cfg)


def _builtin_size() -> tuple[int, int]:
    return toy_world.SIZE, toy_world.SIZE  # every picture of the toy world's styled set is drawn at one size


# --- filling the cache for a trial ------------------------------------------------------------------


def cache_root(cfg) -> Path:
    return Path(cfg.cache.dir or Path(cfg.model.cache_dir) / "features").expanduser()


def class_images_root(cfg) -> Path:
    """Where the base model's class images (data.num_class_images) are kept, one folder per namespace
    (class_images.class_namespace). Beside the features, not under cache.dir: they are images the trial
    trains on, drawn whether or not features are cached (cache.enabled)."""
    return Path(cfg.model.cache_dir).expanduser() / "class_images"


def prepare(cfg, components, dataset, device: torch.device, autocast_dtype: torch.dtype | None) -> dict:
    """Fill (or verify) this trial's latents and text entries and attach the stores to `dataset`.

    Returns what happened, for metrics.json: per kind, entries / hits / computed / corrupt, or
    why that kind is encoded live.
    """
    if not cfg.cache.enabled:
        return {"latents": "live (cache.enabled=false)", "text": "live (cache.enabled=false)"}
    root = cache_root(cfg)
    if not latents_cached(cfg, dataset):
        log.info("cache: data.crop=random can cut these images in many places: latents are encoded live "
                 "each step (data.crop=center caches them)")
        latents = "live (data.crop=random on images larger than their target)"
    else:
        latents = _prepare_latents(cfg, components, dataset, dataset.fixed_views(), root, device)
    if text_cached(cfg):
        text = _prepare_text(cfg, components, dataset, root, device, autocast_dtype)
    else:
        text = "live (text_encoder.train or textual inversion: the encoders change every step)"
    report = {"latents": latents, "text": text}
    for kind, what in report.items():
        if isinstance(what, dict):
            log.info("cache: %s %d/%d from cache, %d computed (%d corrupt) in %.1f s under %s", kind, what["hits"],
                     what["entries"], what["computed"], what["corrupt"], what["seconds"], root)
    return report


def _prepare_latents(cfg, components, dataset, views: list, root: Path, device: torch.device) -> dict:
    """Cache the latent distribution of every view training can draw; the data set then reads them."""
    latents = LatentStore(root, latent_namespace(components.vae))
    vae = components.vae
    vae_dtype = next(vae.parameters()).dtype

    @torch.no_grad()
    def encode(chunk):
        pixels = torch.stack([dataset.pixels(v) for v in chunk]).to(device, vae_dtype)
        return [{"latent_dist": p} for p in vae.encode(pixels).latent_dist.parameters]

    wanted = {latents.key(dataset.records[v.index], v): v for v in views}
    # images of one bucket share a shape: encode them together, buckets one after another
    wanted = dict(sorted(wanted.items(), key=lambda kv: kv[1].target))
    report = fill(latents.entries, wanted, _same_shape(encode), cfg.train.batch_size, "latents").as_dict()
    dataset.latents = latents
    return report


def _prepare_text(cfg, components, dataset, root: Path, device: torch.device,
                  autocast_dtype: torch.dtype | None) -> dict:
    """Cache the frozen text encoders' outputs for every caption and the empty prompt."""
    from sdsweep.model.conditioning import encode_text

    texts = TextStore(root, text_namespace(components, autocast_dtype))

    @torch.no_grad()
    def encode_captions(captions):
        # the same autocast as the training step, so cached and live embeddings agree
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            parts = encode_text(components, captions, device)
        return [{name: t[i] for name, t in parts.items()} for i in range(len(captions))]

    captions = sorted({r.caption for r in dataset.records} | {""})  # "": the empty prompt of caption dropout
    wanted = {texts.key(c): c for c in captions}
    report = fill(texts.entries, wanted, encode_captions, cfg.train.batch_size, "text").as_dict()
    dataset.texts = texts
    return report


def _same_shape(encode: Callable[[list], list]) -> Callable[[list], list]:
    """Split a chunk of views where the target shape changes (buckets), encode each run."""

    def run(chunk: list) -> list:
        out, start = [], 0
        for i in range(1, len(chunk) + 1):
            if i == len(chunk) or chunk[i].target != chunk[start].target:
                out += encode(chunk[start:i])
                start = i
        return out

    return run

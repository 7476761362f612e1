"""The feature cache: computed once per sweep, shared, checked on read, and never changes the training."""

from __future__ import annotations

import threading

import pytest
import torch

from sdsweep.data import cache
from sdsweep.data.cache import EntryStore, decode_entry, encode_entry, fill
from sdsweep.sweep.trial import run_trial


@pytest.fixture
def make_cfg(make_cfg):
    """Training only: evaluation has its own tests (test_evaluate.py), and costs seconds per trial."""
    return lambda *overrides, **kwargs: make_cfg("eval.enabled=false", *overrides, **kwargs)


@pytest.fixture
def vae_calls(monkeypatch):
    """Counts images the VAE encoder (every AutoencoderKL) really encodes; the memory estimator's
    trace of an encoding on the meta device computes nothing and is not counted."""
    from diffusers import AutoencoderKL

    calls = []
    original = AutoencoderKL.encode

    def counting(self, *args, **kwargs):
        if not (args and args[0].device.type == "meta"):
            calls.append(args[0].shape[0] if args else None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    return calls


@pytest.fixture
def text_calls(monkeypatch):
    """Counts text encodings (live or for the cache)."""
    from sdsweep.model import conditioning

    calls = []
    original = conditioning.encode_text

    def counting(components, captions, device):
        calls.append(len(captions))
        return original(components, captions, device)

    monkeypatch.setattr(conditioning, "encode_text", counting)
    monkeypatch.setattr("sdsweep.train.loop.encode_text", counting)
    return calls


def _entries(root, kind: str) -> list:
    return sorted((root / kind).rglob("*.safetensors"))


# --- entries -------------------------------------------------------------------------------------


def test_an_entry_round_trips_and_any_damage_is_detected():
    tensors = {"a": torch.randn(4, 8), "b": torch.randn(3).half()}
    blob = encode_entry(tensors)
    back = decode_entry(blob)
    assert back is not None and all(torch.equal(back[k], tensors[k]) for k in tensors)
    flipped = bytearray(blob)
    flipped[-5] ^= 0xFF
    assert decode_entry(bytes(flipped)) is None  # a flipped bit in the data
    assert decode_entry(blob[: len(blob) // 2]) is None  # truncated
    assert decode_entry(b"") is None
    assert decode_entry(b"\x10" + blob[1:]) is None  # a broken header


def test_two_trials_filling_at_once_compute_each_entry_once(tmp_path):
    store = EntryStore(tmp_path / "ns")
    computed: list[int] = []
    lock = threading.Lock()

    def compute(items):
        with lock:
            computed.extend(items)
        return [{"x": torch.full((16,), float(i))} for i in items]

    wanted = {f"{i:064x}": i for i in range(40)}
    reports = []
    threads = [threading.Thread(target=lambda: reports.append(fill(store, wanted, compute, 4, "test")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(computed) == list(range(40))  # each once, by whichever trial got the lock first
    assert sorted(r.computed for r in reports) == [0, 40] and sorted(r.hits for r in reports) == [0, 40]
    assert all(store.read(k)["x"][0].item() == i for k, i in wanted.items())
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary files left behind


def test_concurrent_writers_of_one_key_leave_a_whole_entry(tmp_path):
    store = EntryStore(tmp_path)
    key, tensors = "ab" * 32, {"x": torch.arange(10_000, dtype=torch.float32)}
    seen = []

    def reader():
        for _ in range(200):
            if store.path(key).exists():
                seen.append(store.status(key))

    writers = [threading.Thread(target=lambda: [store.write(key, tensors) for _ in range(30)]) for _ in range(2)]
    threads = [*writers, threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(seen) <= {"ok"} and store.status(key) == "ok"


# --- trials -----------------------------------------------------------------------------------------


def test_the_second_trial_of_a_sweep_hits_the_cache(make_cfg, tmp_path, vae_calls, text_calls):
    cache_dir = tmp_path / "features"
    first = run_trial(make_cfg(f"cache.dir={cache_dir}", "targets=attn", steps=2), tmp_path / "a")
    assert first["status"] == "finished", first.get("reason")
    n_images = first["data"]["images"]
    assert first["data"]["cache"]["latents"]["computed"] == 2 * n_images  # both flips of each image
    assert first["data"]["cache"]["text"]["computed"] == n_images + 1  # every caption and the empty prompt
    assert sum(vae_calls) == 2 * n_images
    vae_calls.clear()
    text_calls.clear()
    second = run_trial(make_cfg(f"cache.dir={cache_dir}", "targets=many", "adapter=dora", steps=2), tmp_path / "b")
    assert second["status"] == "finished", second.get("reason")
    assert vae_calls == [] and text_calls == []  # neither the VAE encoder nor a text encoder ran again
    assert second["data"]["cache"]["latents"] == {**second["data"]["cache"]["latents"], "hits": 2 * n_images,
                                                  "computed": 0, "corrupt": 0}
    assert second["data"]["cache"]["text"]["hits"] == n_images + 1


def test_a_corrupt_entry_is_detected_and_rebuilt(make_cfg, tmp_path, vae_calls):
    cache_dir = tmp_path / "features"
    assert run_trial(make_cfg(f"cache.dir={cache_dir}", steps=1), tmp_path / "a")["status"] == "finished"
    latent_file, text_file = _entries(cache_dir, "latents")[3], _entries(cache_dir, "text")[2]
    good_latent = latent_file.read_bytes()
    damaged = bytearray(good_latent)
    damaged[-7] ^= 0x55
    latent_file.write_bytes(bytes(damaged))
    text_file.write_bytes(text_file.read_bytes()[:100])  # truncated
    vae_calls.clear()
    second = run_trial(make_cfg(f"cache.dir={cache_dir}", steps=1), tmp_path / "b")
    assert second["status"] == "finished", second.get("reason")
    assert second["data"]["cache"]["latents"]["corrupt"] == 1 and second["data"]["cache"]["latents"]["computed"] == 1
    assert second["data"]["cache"]["text"]["corrupt"] == 1 and second["data"]["cache"]["text"]["computed"] == 1
    assert vae_calls == [1]  # only the bad entry was encoded again
    rebuilt = decode_entry(latent_file.read_bytes())["latent_dist"]  # rebuilt, valid, and the same latents
    assert torch.allclose(rebuilt, decode_entry(good_latent)["latent_dist"], atol=1e-5)  # (batch of 1 vs 2)
    assert decode_entry(text_file.read_bytes()) is not None


def test_cached_training_is_the_same_training(make_cfg, tmp_path):
    """Cold cache, warm cache and no cache give the same loss curve (latents sampled from the same
    distribution with the same draw; text conditioned identically)."""
    common = [f"cache.dir={tmp_path / 'features'}", "data.caption_dropout=0.5"]
    live = run_trial(make_cfg(*common, "cache.enabled=false", steps=3), tmp_path / "live")
    assert live["data"]["cache"]["latents"].startswith("live")
    cold = run_trial(make_cfg(*common, steps=3), tmp_path / "cold")
    warm = run_trial(make_cfg(*common, steps=3), tmp_path / "warm")
    assert cold["data"]["cache"]["latents"]["computed"] > 0 and warm["data"]["cache"]["latents"]["computed"] == 0
    assert cold["losses"] == pytest.approx(live["losses"], rel=1e-4)
    assert warm["losses"] == pytest.approx(live["losses"], rel=1e-4)


def test_text_encoder_training_uses_cached_latents_and_live_text(make_cfg, tmp_path, vae_calls, text_calls):
    cache_dir = tmp_path / "features"
    run_trial(make_cfg(f"cache.dir={cache_dir}", steps=1), tmp_path / "a")
    vae_calls.clear()
    text_calls.clear()
    metrics = run_trial(make_cfg(f"cache.dir={cache_dir}", "text_encoder=lora", steps=2), tmp_path / "b")
    assert metrics["status"] == "finished", metrics.get("reason")
    assert metrics["data"]["cache"]["latents"]["hits"] > 0 and vae_calls == []
    assert metrics["data"]["cache"]["text"].startswith("live (text_encoder.train")
    assert len(text_calls) == 2  # encoded live, once per step


def test_random_crops_of_larger_images_encode_latents_live_but_cache_text(make_cfg, tmp_path, vae_calls):
    from helpers import write_folder

    folder = write_folder(tmp_path / "data", n=3, size=(96, 64))
    common = [f"cache.dir={tmp_path / 'features'}", f"data.path={folder}"]
    random_crop = run_trial(make_cfg(*common, "data.crop=random", steps=2), tmp_path / "r")
    assert random_crop["data"]["cache"]["latents"].startswith("live (data.crop=random")
    assert isinstance(random_crop["data"]["cache"]["text"], dict)
    assert len(vae_calls) == 2  # one encode per step
    centre = run_trial(make_cfg(*common, "data.crop=center", steps=2), tmp_path / "c")
    assert centre["data"]["cache"]["latents"]["computed"] == 6


def test_another_vae_or_dtype_is_another_namespace(make_cfg):
    from sdsweep.model import load as models

    vae = models.load_components(make_cfg().model).vae
    before = cache.latent_namespace(vae)
    assert cache.latent_namespace(vae) == before  # stable
    with torch.no_grad():
        next(vae.encoder.parameters()).add_(1e-3)
        for p in vae.parameters():  # onto fp16's grid, so that .half() below keeps every value exactly
            p.copy_(p.half().float())
    changed_fp32 = cache.latent_namespace(vae)
    assert changed_fp32 != before
    fp32_weights = {k: v.clone() for k, v in vae.state_dict().items()}
    vae.half()
    assert all(torch.equal(v.float(), fp32_weights[k]) for k, v in vae.state_dict().items())  # same numbers...
    assert cache.latent_namespace(vae) != changed_fp32  # ...in another dtype: another namespace


def test_a_used_tokenizer_keeps_its_fingerprint(make_cfg):
    """The kept base hands the next trial tokenizers that have tokenized; their cache namespace stays."""
    import copy

    from sdsweep.data.cache import tokenizer_fingerprint
    from sdsweep.model import kept_base

    components, _ = kept_base.acquire(make_cfg(), torch.device("cpu"))
    tokenizer = components.tokenizers[0]
    before = tokenizer_fingerprint(tokenizer)
    ids = tokenizer(["a caption"], padding="max_length", truncation=True, max_length=tokenizer.model_max_length)
    backend = tokenizer.backend_tokenizer
    state = backend.truncation, backend.padding
    assert tokenizer_fingerprint(tokenizer) == before
    assert tokenizer_fingerprint(copy.deepcopy(tokenizer)) == before  # computed afresh, not remembered
    assert (backend.truncation, backend.padding) == state  # the call's settings are left as they were
    assert tokenizer(["a caption"], padding="max_length", truncation=True,
                     max_length=tokenizer.model_max_length).input_ids == ids.input_ids


def test_a_tokenizer_fingerprint_follows_added_tokens(make_cfg):
    """The fingerprint is remembered per tokenizer; a token added to it (textual inversion) is another
    vocabulary, and removing it again gives back the first fingerprint, computed afresh or remembered."""
    import copy

    from sdsweep.data import cache
    from sdsweep.model import kept_base

    components, _ = kept_base.acquire(make_cfg(), torch.device("cpu"))
    tokenizer = copy.deepcopy(components.tokenizers[0])
    before = cache.tokenizer_fingerprint(tokenizer)
    assert cache._TOKENIZER_FINGERPRINTS[tokenizer][1] == before  # remembered
    assert before == cache._tokenizer_spec_hash(tokenizer)  # and what computing it gives
    tokenizer.add_tokens(["<new-token>"])
    added = cache.tokenizer_fingerprint(tokenizer)
    assert added != before and added == cache._tokenizer_spec_hash(tokenizer)
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    encoder = copy.deepcopy(components.text_encoders[0])
    encoder.resize_token_embeddings(len(tokenizer))
    # what evaluation does between trials (model/textual_inversion.remove), on this tokenizer alone
    TextualInversionLoaderMixin.unload_textual_inversion(None, tokens=["<new-token>"], tokenizer=tokenizer,
                                                         text_encoder=encoder)
    assert cache.tokenizer_fingerprint(tokenizer) == before == cache._tokenizer_spec_hash(tokenizer)


def test_a_tokenizer_loaded_again_from_the_same_files_has_the_same_fingerprint(make_cfg, tmp_path):
    """A trial that loads the base afresh gets new tokenizer objects from the same folder: the same
    fingerprint (its text cache hits). Files written anew with another vocabulary: another one."""
    from transformers import CLIPTokenizer

    from sdsweep.data import cache
    from sdsweep.model import kept_base

    components, _ = kept_base.acquire(make_cfg(), torch.device("cpu"))
    components.tokenizers[0].save_pretrained(tmp_path / "tok")
    first = cache.tokenizer_fingerprint(CLIPTokenizer.from_pretrained(tmp_path / "tok"))
    assert cache.tokenizer_fingerprint(CLIPTokenizer.from_pretrained(tmp_path / "tok")) == first
    other = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    other.add_tokens(["<in-the-files>"])
    other.save_pretrained(tmp_path / "tok")  # the folder now holds another vocabulary
    assert cache.tokenizer_fingerprint(CLIPTokenizer.from_pretrained(tmp_path / "tok")) != first


def test_two_tokenizers_of_one_model_folder_keep_their_own_fingerprints(make_cfg, tmp_path):
    """from_pretrained(folder, subfolder=...) names the model's folder, not the tokenizer's: two
    tokenizers of one model, alike in size and special tokens but mapping words to other ids, must not
    share a fingerprint (the text cache would hand one's embeddings to the other)."""
    import json

    from transformers import CLIPTokenizer

    from sdsweep.data import cache
    from sdsweep.model import kept_base

    components, _ = kept_base.acquire(make_cfg(), torch.device("cpu"))
    for sub in ("tokenizer", "tokenizer_2"):
        components.tokenizers[0].save_pretrained(tmp_path / sub)
    spec = json.loads((tmp_path / "tokenizer_2" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["cat</w>"], vocab["dog</w>"] = vocab["dog</w>"], vocab["cat</w>"]  # same size, other ids
    (tmp_path / "tokenizer_2" / "tokenizer.json").write_text(json.dumps(spec))
    first, second = (CLIPTokenizer.from_pretrained(tmp_path, subfolder=sub) for sub in ("tokenizer", "tokenizer_2"))
    assert first("a cat").input_ids != second("a cat").input_ids
    assert cache.tokenizer_fingerprint(first) != cache.tokenizer_fingerprint(second)

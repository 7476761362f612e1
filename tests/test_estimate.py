"""The memory estimator: exact parameter counts, a step trace that agrees with real tensors and with
torch's own autocast, sensible orderings, SDXL against public figures, and the budget in a sweep."""

from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from sdsweep.layout import TrialDir
from sdsweep.model import adapters
from sdsweep.model.architectures import SDXL_UNET, family_components
from sdsweep.sweep import estimate
from sdsweep.sweep.estimate import _CudaOps, _LiveBytes, estimate_peak, meta_modules
from sdsweep.sweep.prune import prune_reason
from sdsweep.sweep.trial import run_trial

GIB = 2**30


def test_meta_parameter_counts_equal_the_loaded_models(make_cfg):
    from sdsweep.model.load import load_components

    cfg = make_cfg()
    unbuilt, _ = estimate.component_configs(cfg.model)  # from tiny.py's builders: nothing written
    loaded = load_components(cfg.model).modules()
    configs, _ = estimate.component_configs(cfg.model)  # now from the built folder's config.json files
    for meta in (meta_modules(unbuilt), meta_modules(configs)):
        assert set(meta) == set(loaded)
        for name, module in loaded.items():
            assert sum(p.numel() for p in meta[name].parameters()) == sum(p.numel() for p in module.parameters()), name


def test_reference_architectures_have_the_published_sizes():
    def counts(family):
        return {n: sum(p.numel() for p in m.parameters()) for n, m in meta_modules(family_components(family)).items()}

    assert counts("sdxl") == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                              "text_encoder_2": 694_659_840}
    sd3 = counts("sd3")
    assert sd3["transformer"] == 2_028_328_000 and sd3["text_encoder_3"] == 4_762_310_656  # SD3 Medium, T5-XXL


def _tiny_unet(cfg):
    """The tiny SDXL UNet with a LoRA, frozen in fp32, on the meta device."""
    configs, _ = estimate.component_configs(cfg.model)
    unet = meta_modules({"unet": configs["unet"]})["unet"]
    adapters.attach(unet, cfg.adapter, list(cfg.targets.patterns), "unet")
    return unet


def _step(unet, device, autocast=None) -> tuple[int, int]:
    """(peak live bytes of forward + backward, bytes saved for backward at the end of the forward)."""
    saved: dict[int, int] = {}
    params = {t.untyped_storage()._cdata for t in [*unet.parameters(), *unet.buffers()]}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with _LiveBytes(params) as live:
        with _CudaOps(autocast), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = torch.randn(2, 4, 16, 16, device=device)
            out = unet(x, torch.zeros(2, dtype=torch.long, device=device), torch.randn(2, 77, 64, device=device),
                       added_cond_kwargs={"text_embeds": torch.randn(2, 32, device=device),
                                          "time_ids": torch.zeros(2, 6, device=device)}).sample
            loss = torch.nn.functional.mse_loss(out.float(), x)
        loss.backward()
    return live.peak, sum(saved.values())


def test_the_meta_trace_agrees_with_real_tensors_on_the_cpu(make_cfg):
    cfg = make_cfg()
    unet = _tiny_unet(cfg)
    meta_peak, meta_saved = _step(unet, "meta")
    real = unet.to_empty(device="cpu")
    for p in real.parameters():
        torch.nn.init.normal_(p, std=0.02)
    for p in real.parameters():
        p.grad = None
    real_peak, real_saved = _step(real, "cpu")
    # the same code on real tensors keeps the same storages alive: meta shapes and lifetimes are faithful
    assert meta_saved == real_saved > 0
    assert meta_peak == pytest.approx(real_peak, rel=0.02)
    # and the peak is what is saved for backward plus the (smaller) gradients flowing through it
    assert real_saved < real_peak < 3 * real_saved


def test_autocast_emulation_saves_what_torch_autocast_saves(make_cfg):
    """On fake CUDA tensors torch's own autocast runs (no GPU needed): the emulated casts must keep
    exactly the same bytes for backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = make_cfg()
    unet = _tiny_unet(cfg)
    for m in unet.modules():  # frozen weights in fp16, adapters in fp32, as models.place + attach leave them
        for name, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                setattr(m, name, torch.nn.Parameter(p.half(), requires_grad=False))
    emulated = _saved_forward(unet, "meta", torch.float16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = unet.to_empty(device="cuda")
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", torch.float16)
        torch.autocast_increment_nesting()
        try:
            real_autocast = _saved_forward(fake, "cuda", None)
        finally:
            torch.autocast_decrement_nesting()
            torch.set_autocast_enabled("cuda", False)
            torch.clear_autocast_cache()
    assert emulated == real_autocast > 0


def _saved_forward(unet, device, autocast) -> int:
    saved: dict[int, int] = {}
    params = {t.untyped_storage()._cdata for t in [*unet.parameters(), *unet.buffers()]}

    def pack(t):
        if t.untyped_storage()._cdata not in params:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with _CudaOps(autocast), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = torch.empty(2, 4, 16, 16, device=device)
        unet(x, torch.zeros(2, dtype=torch.long, device=device), torch.empty(2, 77, 64, device=device),
             added_cond_kwargs={"text_embeds": torch.empty(2, 32, device=device),
                                "time_ids": torch.empty(2, 6, device=device)})
    return sum(saved.values())


def test_more_pixels_and_no_checkpointing_cost_more_and_cheaper_state_costs_less(make_cfg):
    base = ("data.resolution=128", "adapter.rank=64")
    small, big = estimate_peak(make_cfg("data.resolution=64", "adapter.rank=64")), estimate_peak(make_cfg(*base))
    ckpt = estimate_peak(make_cfg(*base, "train.gradient_checkpointing=true"))
    eight_bit = estimate_peak(make_cfg(*base, "optimizer=adamw8bit"))
    assert big.activations_gb > 3 * small.activations_gb  # 4x the latent pixels
    assert ckpt.phases["training step"] < big.phases["training step"]
    assert eight_bit.adapter_gb < big.adapter_gb
    assert big.trainable_params == eight_bit.trainable_params > 0
    # optimizer state per parameter: AdamW 2 fp32 moments, bitsandbytes 8-bit 2 bytes (+absmax), Prodigy 4 fp32
    assert estimate.optimizer_state_bytes(10_000, "adamw") == 80_000
    assert estimate.optimizer_state_bytes(10_000, "adamw8bit") == pytest.approx(20_000, rel=0.02)
    assert estimate.optimizer_state_bytes(100, "adamw8bit") == 800  # small tensors keep fp32 state
    assert estimate.optimizer_state_bytes(10_000, "prodigy") == 160_000


def test_quantized_weights_take_less_than_half_precision():
    sdxl = meta_modules({"unet": family_components("sdxl")["unet"]})["unet"]
    from omegaconf import OmegaConf

    def precision(name, quantize):
        return OmegaConf.create({"name": name, "base_dtype": "fp16", "vae_dtype": "fp32", "quantize": quantize})

    fp16 = estimate.frozen_bytes("unet", sdxl, precision("fp16", "none"))
    int8 = estimate.frozen_bytes("unet", sdxl, precision("int8", "int8"))
    nf4 = estimate.frozen_bytes("unet", sdxl, precision("nf4", "nf4"))
    assert fp16 == 2 * 2_567_463_684
    # models.quantize_unet leaves convolutions and norms in fp32, so neither is 1/2 or 1/4 of fp16
    assert nf4 < int8 < fp16


@pytest.mark.slow  # two full-size SDXL traces: ~10 s on an idle 2-core CPU
def test_sdxl_at_1024_is_in_the_range_of_public_figures():
    """SimpleTuner's SDXL LoKr at 1024 px, bf16, batch 1 on an H100: 13.0 GiB without gradient
    checkpointing, 6.5 GiB with. It trains the UNet alone (text encoders and VAE are not resident
    while training), so the comparable figure is our training-step peak without those weights.
    Tolerance +-25%: LoKr vs LoRA, another attention and allocator set-up, and the source does not
    say whether it reports allocated or reserved memory."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    def cfg(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="sdsweep.conf", version_base="1.3"):
            return compose(config_name="config", overrides=["model=sdxl", "precision=bf16", "data.resolution=1024",
                                                            "train.batch_size=1", "adapter.rank=16", *overrides])

    with_ckpt = estimate_peak(cfg("train.gradient_checkpointing=true"))
    without = estimate_peak(cfg())
    # SDXL's UNet has 10 transformer blocks of width 640 and 60 of 1280 (see _attention_lora_params):
    # 10 * 16 * (14 * 640 + 2 * 2048) + 60 * 16 * (14 * 1280 + 2 * 2048) = 2_088_960 + 21_135_360
    assert _attention_lora_params(SDXL_UNET, rank=16) == 23_224_320
    for e in (with_ckpt, without):  # offline and not in the hub cache: the reference architecture
        assert e.total_gb is not None, e.reason
        assert e.params["unet"] == 2_567_463_684 and e.trainable_params == _attention_lora_params(SDXL_UNET, 16)
    # what stays on the GPU beside the UNet while training (cached encoders are moved off it)
    resident = sum(v for k, v in with_ckpt.weights_by_component.items() if k != "unet") - with_ckpt.offloadable_gb
    assert 0.75 * 6.5 <= with_ckpt.phases["training step"] - resident <= 1.25 * 6.5
    assert 0.75 * 13.0 <= without.phases["training step"] - resident <= 1.25 * 13.0
    assert with_ckpt.total_gb <= without.total_gb


def test_a_cell_over_budget_on_cuda_is_pruned_and_the_sweep_goes_on(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    over = make_cfg("device=auto", "sweep.vram_budget_gb=0.5")  # the tiny model still needs the CUDA context
    metrics = run_trial(over, tmp_path / "over")  # returns: the next cell of the sweep runs
    assert metrics["status"] == "pruned"
    assert "sweep.vram_budget_gb=0.5" in metrics["reason"] and "predicted peak" in metrics["reason"]
    assert "train.gradient_checkpointing=true" in metrics["reason"]
    assert not (tmp_path / "over" / "adapter").exists()
    assert prune_reason(make_cfg("device=auto", "sweep.vram_budget_gb=16")) is None
    assert prune_reason(make_cfg("device=auto", "sweep.vram_budget_gb=0")) is None  # 0: no budget


def test_on_a_cpu_the_budget_prunes_nothing_and_the_prediction_costs_nothing_unless_asked(make_cfg, tmp_path,
                                                                                          monkeypatch):
    cfg = make_cfg("sweep.vram_budget_gb=0.01", "precision=int8")  # int8: pruned here for its own reason
    assert "CUDA" in prune_reason(cfg) and "vram_budget_gb" not in prune_reason(cfg)
    assert prune_reason(make_cfg("sweep.vram_budget_gb=0.01")) is None
    # sweep.estimate=auto (the default): a CPU run has no budget to read a prediction, so none is made
    from sdsweep.sweep import estimate as E

    traced = []
    monkeypatch.setattr(E, "_estimate", lambda *a, **k: traced.append(1) or pytest.fail("estimated on a CPU run"))
    metrics = run_trial(make_cfg("sweep.vram_budget_gb=0.01"), tmp_path / "auto")
    assert metrics["status"] == "finished" and not traced
    assert metrics["predicted_peak_vram_gb"] is None and "sweep.estimate=always" in metrics["predicted_vram"]["reason"]
    assert metrics["estimate_s"] < 0.01
    monkeypatch.undo()
    # sweep.estimate=always: recorded on a CPU too (a GPU sweep planned on a laptop)
    metrics = run_trial(make_cfg("sweep.vram_budget_gb=0.01", "sweep.estimate=always"), tmp_path / "always")
    assert metrics["status"] == "finished"  # still not pruned: a CPU run
    assert metrics["predicted_peak_vram_gb"] > 0
    assert metrics["predicted_vram"]["trainable_params"] > 0
    # sweep.estimate=never on CUDA: no prediction, so no budget pruning either
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert prune_reason(make_cfg("device=auto", "sweep.vram_budget_gb=0.5", "sweep.estimate=never")) is None
    assert prune_reason(make_cfg("device=auto", "sweep.vram_budget_gb=0.5")) is not None


def test_an_unreadable_model_gives_no_estimate_and_never_an_error(make_cfg):
    e = estimate_peak(make_cfg("model=sdxl", "model.pretrained=nobody/not-a-model"))
    assert e.total_gb is None and "nobody/not-a-model" in e.reason
    assert e.fits(1.0)  # no prediction: nothing to prune on


# --- trainable parameters from the architecture ---------------------------------------------------------


def _attention_lora_params(unet_config: dict, rank: int) -> int:
    """LoRA parameters of targets=attn on a diffusers UNet2DConditionModel, counted from its config.

    A LoRA on Linear(in, out) adds A (rank x in) and B (out x rank): rank * (in + out). Each
    transformer block of width C has attn1 (self-attention: to_q, to_k, to_v, to_out.0 all C -> C)
    and attn2 (cross-attention: to_q and to_out.0 C -> C, to_k and to_v cross_attention_dim -> C):
    rank * (8C + 4C + 2 (cross + C)) = rank * (14C + 2 cross). Where the blocks are, as
    UNet2DConditionModel builds them: down block i has layers_per_block attentions of
    transformer_layers_per_block[i] blocks, the (default) UNetMidBlock2DCrossAttn one of
    transformer_layers_per_block[-1], up block i layers_per_block + 1 of the reversed list's i-th."""
    assert unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn"
    widths, layers = list(unet_config["block_out_channels"]), unet_config["layers_per_block"]
    depth = unet_config.get("transformer_layers_per_block", 1)
    depth = [depth] * len(widths) if isinstance(depth, int) else list(depth)
    blocks: Counter = Counter({widths[-1]: depth[-1]})  # the mid block
    for i, kind in enumerate(unet_config["down_block_types"]):
        if kind.startswith("CrossAttn"):
            blocks[widths[i]] += layers * depth[i]
    for i, kind in enumerate(unet_config["up_block_types"]):
        if kind.startswith("CrossAttn"):
            blocks[widths[::-1][i]] += (layers + 1) * depth[::-1][i]
    cross = unet_config["cross_attention_dim"]
    return sum(n * rank * (14 * width + 2 * cross) for width, n in blocks.items())


def test_the_trainable_count_is_rank_times_in_plus_out_of_each_attention_projection(make_cfg):
    """The count the SDXL test relies on, checked on the tiny SDXL UNet (8 blocks of width 64:
    2 down, 2 mid, 4 up) against what the estimator attaches."""
    cfg = make_cfg("adapter.rank=8")
    configs, _ = estimate.component_configs(cfg.model)
    assert _attention_lora_params(configs["unet"][1], rank=8) == 8 * 8 * (14 * 64 + 2 * 64) == 65_536
    assert estimate_peak(cfg).trainable_params == 65_536


# --- the memo: its key holds everything an estimate reads -------------------------------------------------


@contextmanager
def _config_reads():
    """The full keys of every config value read (attribute, item, .get: DictConfig._get_impl serves
    them all), groups left out: only leaves are values an estimate can depend on."""
    reads: set[str] = set()
    original = DictConfig._get_impl

    def recording(self, key, default_value, validate_key=True):
        value = original(self, key, default_value, validate_key)
        if not isinstance(value, DictConfig):
            reads.add(self._get_full_key(key))
        return value

    DictConfig._get_impl = recording
    try:
        yield reads
    finally:
        DictConfig._get_impl = original


def _configs_through_every_branch(make_cfg, tmp_path) -> list:
    """Configs that between them take every branch of the estimator that reads the config: a tiny
    model from its folder, a diffusers folder (sd3, T5 dropped), a single-file checkpoint with its
    configs from a folder, trained text encoders, a quantized UNet, buckets, an image folder."""
    from helpers import write_folder

    from sdsweep.model.load import resolve_source

    sdxl_folder = resolve_source(make_cfg().model)  # builds the tiny models: their configs are then read
    sd3_folder = resolve_source(make_cfg("model=tiny-sd3").model)
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")  # only its name is looked at: the configs come from single_file_config
    return [
        make_cfg(),  # the toy model: its configs from toy.py
        make_cfg("model=tiny-sdxl"),  # a random tiny model: from its folder (model.cache_dir)
        make_cfg("model=tiny-sd3", "model.build_tiny=false", f"model.pretrained={sd3_folder}", "model.drop_t5=true"),
        make_cfg("model.build_tiny=false", f"model.pretrained={checkpoint}", f"model.single_file_config={sdxl_folder}",
                 "text_encoder=lora", "precision=int8", "data.buckets=true", "data.bucket_step=16"),
        make_cfg(f"data.path={write_folder(tmp_path / 'data', n=2)}", "data.crop=center", "tracking.validation_every=2"),
    ]


def test_the_memo_key_holds_every_config_value_the_estimate_reads(make_cfg, tmp_path):
    reads: set[str] = set()
    for cfg in _configs_through_every_branch(make_cfg, tmp_path):
        with _config_reads() as read:
            e = estimate._estimate(cfg)
        assert e.total_gb is not None, e.reason
        reads |= read
    assert reads == set(estimate.ESTIMATE_INPUTS) | set(estimate.VALUE_ONLY_INPUTS)  # no more, no fewer
    # and the key is those values: two configs differing in one of them have different keys
    cfg = make_cfg("data.buckets=true", "text_encoder=lora")
    assert json.loads(estimate.cache_key(cfg)) == {
        path: OmegaConf.to_container(v) if isinstance(v, ListConfig) else v
        for path in estimate.ESTIMATE_INPUTS for v in [OmegaConf.select(cfg, path)]}


def test_what_the_key_leaves_out_cannot_change_an_estimate(make_cfg):
    def made(*overrides):  # with the memo out of the way
        return {k: v for k, v in estimate._estimate(make_cfg(*overrides)).__dict__.items() if k != "seconds"}

    base = made()
    assert made("adapter.alpha=1", "adapter.init=kaiming") == base  # VALUE_ONLY_INPUTS
    assert estimate.cache_key(make_cfg("adapter.alpha=1", "adapter.init=kaiming", "train.lr=1")) == \
        estimate.cache_key(make_cfg())


def test_validation_during_training_is_another_estimate(make_cfg):
    """Sampling during training keeps the cached encoders on the GPU (train.offload_cached_encoders):
    the training step's peak then holds their weights too."""
    estimate._CACHE.clear()
    offloaded = estimate_peak(make_cfg())
    kept = estimate_peak(make_cfg("tracking.validation_every=5"))
    assert offloaded.offloadable_gb == sum(v for k, v in offloaded.weights_by_component.items() if k != "unet") > 0
    assert kept.phases["training step"] == pytest.approx(offloaded.phases["training step"] + offloaded.offloadable_gb,
                                                         rel=1e-12)


# --- cached latents: the estimator applies training's rule ---------------------------------------------------


@pytest.mark.parametrize(("overrides", "image_size", "trained_on_cached_latents"), [
    ((), None, True),  # the built-in set's 96 px squares: a random crop of them at 64 px has one place
    (("data.buckets=true", "data.bucket_step=16"), None, True),  # square images, the square bucket
    (("cache.enabled=false",), None, False),
    (("data.crop=center",), (96, 64), True),
    (("data.crop=random",), (96, 64), False),
], ids=["builtin-random", "builtin-buckets", "no-cache", "folder-center", "folder-random"])
def test_the_estimator_and_training_agree_on_cached_latents(make_cfg, tmp_path, overrides, image_size,
                                                            trained_on_cached_latents):
    from helpers import write_folder

    data = [f"data.path={write_folder(tmp_path / 'data', n=2, size=image_size)}"] if image_size else []
    cfg = make_cfg(f"cache.dir={tmp_path / 'features'}", *data, *overrides, "sweep.estimate=always", steps=1)
    run_trial(cfg, tmp_path / "trial")
    metrics = json.loads(TrialDir(tmp_path / "trial").metrics.read_text())
    assert isinstance(metrics["data"]["cache"]["latents"], dict) is trained_on_cached_latents
    assert metrics["predicted_vram"]["cached_latents"] is trained_on_cached_latents
    # and the estimate has the VAE off the GPU while training exactly when training moves it
    e = estimate_peak(cfg)
    text = sum(v for k, v in e.weights_by_component.items() if k.startswith("text_encoder"))
    offloaded = (text if cfg.cache.enabled else 0) + (e.weights_by_component["vae"] if trained_on_cached_latents else 0)
    assert e.offloadable_gb == pytest.approx(offloaded, rel=1e-12)


def test_a_random_crop_of_images_not_read_yet_is_estimated_live_and_says_so(make_cfg, tmp_path):
    """Images already at their target's shape are cached by training, but a folder's images are
    not known to the estimator: it assumes the larger, live case, and its notes say what it assumed."""
    from helpers import write_folder

    folder = write_folder(tmp_path / "data", n=2, size=(64, 64))
    cfg = make_cfg(f"cache.dir={tmp_path / 'features'}", f"data.path={folder}", "data.crop=random",
                   "sweep.estimate=always", steps=1)
    metrics = run_trial(cfg, tmp_path / "trial")
    assert isinstance(metrics["data"]["cache"]["latents"], dict)  # training: one view per image
    assert metrics["predicted_vram"]["cached_latents"] is False
    assert any("latents assumed encoded live" in n for n in metrics["predicted_vram"]["notes"])


def test_latents_encoded_live_are_encoded_beside_the_weights_left_on_the_gpu(make_cfg, tmp_path):
    """Live latents with cached text: the VAE encodes each step with the text encoders already in CPU
    memory (train.offload_cached_encoders), so that phase holds their weights only without a cache."""
    folder_random = (f"data.path={tmp_path}", "data.crop=random")  # not read: live from the config alone
    text_cached = estimate_peak(make_cfg(*folder_random))
    nothing_cached = estimate_peak(make_cfg(*folder_random, "cache.enabled=false"))
    text = sum(v for k, v in text_cached.weights_by_component.items() if k.startswith("text_encoder"))
    assert text_cached.offloadable_gb == pytest.approx(text, rel=1e-12) and text > 0
    assert text_cached.phases["VAE encoding"] == pytest.approx(nothing_cached.phases["VAE encoding"] - text,
                                                               rel=1e-12)


# --- the memo on disk ---------------------------------------------------------------------------------------


def test_an_estimate_is_remembered_on_disk_for_another_process(make_cfg, tmp_path):
    """A second process (a resumed sweep, a launcher's worker) reads the estimate instead of tracing again:
    the same figures, marked remembered; a damaged memo is computed again and rewritten."""
    cfg = make_cfg(f"model.cache_dir={tmp_path}", "adapter.rank=3")  # a key no other test uses
    estimate._CACHE.clear()
    computed = estimate_peak(cfg)
    memos = list((tmp_path / "estimates").glob("*.json"))
    assert len(memos) == 1 and not computed.remembered
    estimate._CACHE.clear()  # what a new process starts with
    remembered = estimate_peak(cfg)
    assert remembered.remembered and remembered.metrics()["predicted_vram"]["remembered"] is True

    def figures(e):
        return {k: v for k, v in e.__dict__.items() if k not in ("seconds", "remembered")}

    assert figures(remembered) == figures(computed)
    memos[0].write_text("{truncated")
    estimate._CACHE.clear()
    again = estimate_peak(cfg)
    assert not again.remembered and figures(again) == figures(computed)
    assert json.loads(memos[0].read_text())["total_gb"] == computed.total_gb


def test_the_memo_follows_the_model_folder_and_the_estimator_inputs(make_cfg, tmp_path, monkeypatch):
    """One memo per distinct input: another rank, another version of the estimator or an edited
    component config.json under the same model path is another file, never a stale figure."""
    cfg = make_cfg(f"model.cache_dir={tmp_path}")
    key = estimate.cache_key(cfg)
    configs = estimate.component_configs(cfg.model)
    first = estimate._memo_path(cfg, key, configs)
    assert estimate._memo_path(cfg, key, configs) == first  # stable
    other_rank = make_cfg(f"model.cache_dir={tmp_path}", "adapter.rank=5")
    assert estimate._memo_path(other_rank, estimate.cache_key(other_rank), configs) != first
    edited = ({**configs[0], "unet": (configs[0]["unet"][0], {**configs[0]["unet"][1], "norm_num_groups": 4})},
              configs[1])
    assert estimate._memo_path(cfg, key, edited) != first
    monkeypatch.setattr(estimate, "ESTIMATOR_VERSION", estimate.ESTIMATOR_VERSION + 1)
    assert estimate._memo_path(cfg, key, configs) != first


def test_a_failed_estimate_is_not_remembered(make_cfg, tmp_path):
    cfg = make_cfg(f"model.cache_dir={tmp_path}", "model=sdxl", "model.pretrained=nobody/not-a-model")
    estimate._CACHE.clear()
    assert estimate_peak(cfg).total_gb is None
    assert not (tmp_path / "estimates").exists()

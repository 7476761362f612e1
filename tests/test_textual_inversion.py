"""adapter=textual_inversion: a new token's embeddings trained in each CLIP text encoder, nothing else (issue 16).

Only the new rows change, the saved file is what diffusers' load_textual_inversion reads and it reproduces
the trained encoders exactly, evaluation samples with it against the untouched base, and what textual
inversion cannot do is refused or pruned naming the key."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from sdsweep.config.schema import ConfigError
from sdsweep.config.validate import validate
from sdsweep.eval.sampling import build_pipeline
from sdsweep.layout import TrialDir
from sdsweep.model import load as models
from sdsweep.model import textual_inversion as ti
from sdsweep.sweep.prune import prune_reason
from sdsweep.sweep.trial import run_trial
from sdsweep.train.checkpoints import ADAPTER, list_checkpoints

pytestmark = pytest.mark.xdist_group("textual_inversion")  # the module fixture trains once, on one worker
CHEAP_EVAL = ["eval.prompts=[house]", "eval.seeds=[0]", "eval.steps=2", "eval.guidance_scale=1",
              "eval.metrics=[random_style]", "eval.max_reference_images=2"]
TOKEN = "<my-style>"
# SDXL: two encoders, the clip_l / clip_g file; two vectors; a high rate so two steps change an 8-bit image
TI = ("model=tiny-sdxl", "adapter=textual_inversion", f"adapter.token='{TOKEN}'", "adapter.num_vectors=2",
      "train.lr=0.5", "train.checkpoint_every=2", *CHEAP_EVAL)


@pytest.fixture(scope="module")
def inverted(cache_dir, tmp_path_factory):
    from conftest import config_maker

    cfg = config_maker(cache_dir)(*TI, steps=2, evaluate=True)
    trial = TrialDir(tmp_path_factory.mktemp("ti") / "trial")
    metrics = run_trial(cfg, trial.path)
    assert metrics["status"] == "finished", metrics.get("reason")
    return cfg, trial, metrics


NAMES = ("text_encoder", "text_encoder_2")


def _embedding_key(name: str, encoder) -> str:
    """The checkpoint's key of an encoder's token embedding (`<component>.<its parameter name>`)."""
    weight = encoder.get_input_embeddings().weight
    return f"{name}." + next(n for n, p in encoder.named_parameters() if p is weight)


def _base(cfg):
    components = models.load_components(cfg.model, cfg.precision)
    models.place(components, cfg.precision, torch.device("cpu"))
    return components


def test_only_the_new_tokens_rows_train(inverted):
    cfg, trial, metrics = inverted
    trained = load_file(list_checkpoints(trial.checkpoints)[-1] / ADAPTER)
    base = _base(cfg)
    assert set(trained) == {_embedding_key(n, e) for n, e in zip(NAMES, base.text_encoders)}  # nothing else trains
    for name, tokenizer, encoder in zip(NAMES, base.tokenizers, base.text_encoders):
        before, after = encoder.get_input_embeddings().weight, trained[_embedding_key(name, encoder)]
        vocab = before.shape[0]
        assert after.shape[0] == vocab + 2  # <my-style>, <my-style>_1
        assert torch.equal(after[:vocab], before)  # every word the model knew, bit for bit
        start = before[tokenizer.encode("style", add_special_tokens=False)[0]]
        for row in after[vocab:]:
            assert not torch.equal(row, start)  # the new vectors moved away from the initializer's
    assert metrics["trainable_params"] == 2 * (32 + 32)  # two vectors in each tiny encoder (width 32)
    assert metrics["data"]["cache"]["text"].startswith("live")  # the encoders change: their outputs are not cached


def test_diffusers_load_textual_inversion_reproduces_the_trained_encoders(inverted):
    cfg, trial, _ = inverted
    saved = load_file(trial.adapter / ti.EMBEDDINGS)
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"clip_l": (2, 32), "clip_g": (2, 32)}
    trained = load_file(list_checkpoints(trial.checkpoints)[-1] / ADAPTER)
    pipe = build_pipeline(_base(cfg))
    ti.load(pipe, trial.adapter)  # pipe.load_textual_inversion(state["clip_l"], token=..., ...) per encoder
    reference = _base(cfg)  # the trained encoders: the base's with the checkpoint's embedding matrices
    caption = ti.expanded("a house", cfg.adapter)
    assert caption == f"{TOKEN} {TOKEN}_1 a house"
    for name, (tokenizer, loaded), ref_tokenizer, ref in zip(NAMES, ti.pipeline_encoders(pipe), reference.tokenizers,
                                                             reference.text_encoders):
        ref_tokenizer.add_tokens(ti.placeholder_tokens(cfg.adapter))
        key = _embedding_key(name, ref)
        ref.resize_token_embeddings(len(ref_tokenizer))
        ref.get_input_embeddings().weight.data = trained[key]
        ids = tokenizer(caption, return_tensors="pt").input_ids
        assert torch.equal(ids, ref_tokenizer(caption, return_tensors="pt").input_ids)
        with torch.no_grad():
            assert torch.equal(loaded(ids).last_hidden_state, ref(ids).last_hidden_state)
    # the pipeline spells the token as both vectors, as training did
    assert pipe.maybe_convert_prompt(f"{TOKEN} a house", pipe.tokenizer) == caption


def test_evaluation_samples_the_loaded_embedding_against_the_untouched_base(inverted, cache_dir, tmp_path):
    from conftest import config_maker

    _, trial, metrics = inverted
    assert "eval_error" not in metrics
    base = sorted(trial.base(metrics["eval/base_key"]).path.rglob("*.png"))
    ours = sorted(trial.samples.glob("*.png"))
    assert base and [p.name for p in ours] == [p.name for p in base]  # paired by prompt and seed
    assert all(Image.open(a).tobytes() != Image.open(b).tobytes() for a, b in zip(ours, base))
    lora = run_trial(config_maker(cache_dir)("model=tiny-sdxl", *CHEAP_EVAL, steps=1, evaluate=True), tmp_path / "l")
    assert lora["eval/base_key"] == metrics["eval/base_key"]
    theirs = sorted(TrialDir(tmp_path / "l").base(lora["eval/base_key"]).path.rglob("*.png"))
    assert [Image.open(p).tobytes() for p in base] == [Image.open(p).tobytes() for p in theirs]


def test_sd15_saves_the_a1111_layout_and_loads_through_diffusers(make_cfg, tmp_path):
    cfg = make_cfg("model=tiny-sd15", "adapter=textual_inversion")
    components = _base(cfg)
    ti.attach(components.tokenizers, components.text_encoders, cfg.adapter)
    weight = components.text_encoders[0].get_input_embeddings().weight
    with torch.no_grad():
        weight[-1] = torch.arange(weight.shape[1], dtype=weight.dtype)  # a recognisable learned vector
    ti.save(tmp_path, "sd15", components.tokenizers, components.text_encoders, cfg.adapter)
    assert list(load_file(tmp_path / ti.EMBEDDINGS)) == ["emb_params"]
    pipe = build_pipeline(_base(cfg))
    ti.load(pipe, tmp_path)
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<sdsweep>")]
    assert torch.equal(row, weight[-1].detach())


def test_a_token_the_tokenizer_knows_or_a_multi_token_initializer_is_refused_naming_the_key(make_cfg):
    cfg = make_cfg("model=tiny-sd15", "adapter=textual_inversion")
    components = _base(cfg)
    known = OmegaConf.merge(cfg.adapter, {"token": "house"})
    with pytest.raises(ti.TextualInversionError, match="adapter.token='house'"):
        ti.attach(components.tokenizers, components.text_encoders, known)
    long = OmegaConf.merge(cfg.adapter, {"initializer_token": "photorealistic"})  # photo + realistic
    with pytest.raises(ti.TextualInversionError, match="adapter.initializer_token=.photorealistic. is 2 tokens"):
        ti.attach(components.tokenizers, components.text_encoders, long)
    with pytest.raises(ConfigError, match="adapter.num_vectors=0"):
        validate(make_cfg("adapter=textual_inversion", "adapter.num_vectors=0"))
    with pytest.raises(ConfigError, match="adapter.token='two words'"):
        validate(make_cfg("adapter=textual_inversion", "adapter.token='two words'"))


def test_cells_textual_inversion_cannot_run_are_pruned_with_the_reason(make_cfg):
    assert "no textual-inversion loader" in prune_reason(make_cfg("model=tiny-sd3", "adapter=textual_inversion"))
    assert "only its new embeddings" in prune_reason(make_cfg("adapter=textual_inversion", "text_encoder=lora"))
    assert prune_reason(make_cfg("adapter=textual_inversion")) is None


def test_captions_get_the_trigger_once_spelled_as_every_vector(make_cfg):
    adapter = make_cfg("adapter=textual_inversion", "adapter.num_vectors=3").adapter
    assert ti.expanded("a cat", adapter) == "<sdsweep> <sdsweep>_1 <sdsweep>_2 a cat"
    assert ti.expanded("a <sdsweep> cat", adapter) == "a <sdsweep> <sdsweep>_1 <sdsweep>_2 cat"
    assert ti.with_token("a <sdsweep> cat", "<sdsweep>") == "a <sdsweep> cat"
    assert ti.expanded("", adapter) == "<sdsweep> <sdsweep>_1 <sdsweep>_2"


def test_the_export_command_says_the_saved_file_already_is_the_embedding(inverted):
    from helpers import export_refusal

    cfg, trial, _ = inverted
    assert "learned_embeds.safetensors already is the embedding file" in export_refusal(cfg, trial)

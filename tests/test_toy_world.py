"""The toy world: deterministic pictures, and shipped models whose right answers are known.

The accuracies below are measured on the weights in sdsweep/model/toy_weights (loaded from the
package, never retrained here) with fixed prompts and seeds, so they are exact and repeatable;
the thresholds sit below the figures scripts/train_toy_world.py measured (manifest.json), far
above chance (1/6 for a colour or a subject, 1/2 for the style).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdsweep.data import toy_world as world
from sdsweep.data.toy_world import Item
from sdsweep.eval import toy_clip
from sdsweep.model import toy

SAMPLE_SEEDS = (0, 1)


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("toy-cache")


@pytest.fixture(scope="module")
def clip(toy_cache):
    return toy_clip.load_toy_clip(toy_cache)


@pytest.fixture(scope="module")
def pipe(toy_cache):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(toy.ensure_toy_model(toy_cache))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompt: str, seed: int):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=toy.SAMPLING_STEPS, guidance_scale=toy.GUIDANCE_SCALE,
                height=toy.RESOLUTION, width=toy.RESOLUTION, generator=generator).images[0]


# --- the domain ---------------------------------------------------------------------------------

def test_render_is_a_pure_function_of_item_and_seed():
    item = Item("blue", "star", "sdsweep")
    first = world.render_array(item, 5)
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, world.render_array(item, 5))
    assert not np.array_equal(first, world.render_array(item, 6))  # the seed moves and sizes the subject
    assert not np.array_equal(first, world.render_array(Item("blue", "star"), 5))


def test_styles_differ_where_the_style_says():
    plain, styled = world.render_array(Item("red", "circle"), 0), world.render_array(Item("red", "circle", "sdsweep"), 0)
    corner = (slice(0, 8), slice(0, 8))  # background only: the subject never reaches a corner
    assert len(np.unique(plain[corner].reshape(-1, 3), axis=0)) == 1  # a plain background
    assert len(np.unique(styled[corner].reshape(-1, 3), axis=0)) > 3  # dotted paper
    assert (styled.sum(axis=-1) < 150).sum() > 50 and (plain.sum(axis=-1) < 150).sum() == 0  # black outlines


def test_combinations_split_the_world():
    assert len(world.ALL_COMBOS) == 36 and len(set(world.ALL_COMBOS)) == 36
    assert set(world.HELD_OUT_COMBOS).isdisjoint(world.FINETUNE_COMBOS)
    assert set(world.HELD_OUT_COMBOS) | set(world.FINETUNE_COMBOS) == set(world.ALL_COMBOS)
    for prompts, combos in ((world.IN_DISTRIBUTION_PROMPTS, world.FINETUNE_COMBOS),
                            (world.HELD_OUT_PROMPTS, world.HELD_OUT_COMBOS)):
        items = [world.parse_prompt(p) for p in prompts]
        assert all(it.styled and (it.colour, it.subject) in combos for it in items)
        assert sorted(it.colour for it in items) == sorted(world.COLOURS)
        assert sorted(it.subject for it in items) == sorted(world.SUBJECTS)
    assert world.parse_prompt("an orange star") == Item("orange", "star", "plain")


def test_finetune_set_is_a_data_folder_of_the_styled_renders(tmp_path):
    folder = world.ensure_toy_dataset(str(tmp_path))
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == len(world.FINETUNE_COMBOS) == 24
    from PIL import Image

    for line, (item, seed) in zip(lines, world.finetune_items()):
        assert line["text"] == item.caption and item.styled
        assert (item.colour, item.subject) not in world.HELD_OUT_COMBOS
        assert np.array_equal(np.asarray(Image.open(folder / line["file_name"])), world.render_array(item, seed))


# --- the base model -----------------------------------------------------------------------------

def test_text_encoders_are_drawn_from_numpy_not_torch():
    """The shipped UNet was trained on these exact encoders: their values are pinned as literals (numpy's
    legacy RandomState stream is fixed), whatever torch's initialisation or transformers' tensor names do."""
    first, second = toy.toy_text_encoders()
    tokens_first = next(v for k, v in first.state_dict().items() if k.endswith("token_embedding.weight"))
    tokens_second = next(v for k, v in second.state_dict().items() if k.endswith("token_embedding.weight"))
    row = 320  # "a</w>"
    pinned = torch.tensor
    assert torch.equal(tokens_first[row, :4], pinned([-0.8300601243972778, -0.6473743319511414, -1.1369651556015015,
                                                      -0.09778456389904022]))
    assert torch.equal(tokens_second[row, :4], pinned([-0.3994259536266327, 0.6339422464370728, -0.15639573335647583,
                                                       0.6289169788360596]))
    assert torch.equal(second.state_dict()["text_projection.weight"][0, :3],
                       pinned([0.07787717878818512, -0.25819528102874756, -0.06499996036291122]))
    again = toy.toy_text_encoders()[1].state_dict()
    assert all(torch.equal(v, again[k]) for k, v in second.state_dict().items())
    assert not any(p.requires_grad for p in first.parameters())


def test_toy_model_loads_the_shipped_weights_through_from_pretrained(pipe, toy_cache):
    from safetensors.torch import load_file

    folder = toy.ensure_toy_model(toy_cache)
    assert (folder / "model_index.json").exists() and folder.name.startswith("toy-sdxl-")
    assert toy.ensure_toy_model(toy_cache) == folder  # built once
    shipped = load_file(str(toy.WEIGHTS_DIR / "unet.safetensors"))
    loaded = pipe.unet.state_dict()
    assert set(shipped) == set(loaded)
    assert all(torch.equal(loaded[k], v.float()) for k, v in shipped.items())
    manifest = toy.read_manifest()
    assert pipe.vae.config.scaling_factor == manifest["vae"]["scaling_factor"]
    assert manifest["files"] == {f.name: toy.file_sha256(f) for f in sorted(toy.WEIGHTS_DIR.glob("*.safetensors"))}
    assert sum(f.stat().st_size for f in toy.WEIGHTS_DIR.iterdir()) < 10 * 2**20


def test_sampling_is_deterministic(pipe):
    prompt = world.HELD_OUT_PROMPTS[0]
    assert np.array_equal(np.asarray(sample(pipe, prompt, 0)), np.asarray(sample(pipe, prompt, 0)))
    assert not np.array_equal(np.asarray(sample(pipe, prompt, 0)), np.asarray(sample(pipe, prompt, 1)))


# --- the toy CLIP, and the base model seen through it --------------------------------------------

def test_toy_clip_is_an_open_clip_model_with_the_shipped_weights(clip, toy_cache):
    import open_clip

    model, _, tokenizer = clip
    assert toy_clip.TOY_CLIP_NAME in open_clip.list_models()
    from safetensors.torch import load_file

    shipped = load_file(str(toy_clip.WEIGHTS_FILE))
    ids = shipped["token_embedding.rows.ids"]
    embedding = model.token_embedding.weight
    assert torch.equal(embedding[ids], shipped["token_embedding.rows.weight"].float())
    unused = torch.ones(len(embedding), dtype=torch.bool)
    unused[ids] = False
    assert torch.equal(embedding[unused], toy_clip.token_fill(*embedding.shape)[unused])
    assert set(tokenizer([world.IN_DISTRIBUTION_PROMPTS[0]]).flatten().tolist()) <= set(ids.tolist())


@pytest.mark.parametrize("style", world.STYLES)
def test_toy_clip_knows_colour_subject_and_style_of_renders(clip, style):
    items = [Item(c, s, style) for c, s in world.ALL_COMBOS]
    images = [world.render(item, 7000 + i) for i, item in enumerate(items)]
    result = toy_clip.accuracy(toy_clip.classify(*clip, images), items)
    assert result["colour"] >= 0.97 and result["subject"] >= 0.97 and result["style"] == 1.0, result


def test_toy_clip_scores_the_matching_prompt_above_each_mismatch(clip):
    model, preprocess, tokenizer = clip
    image = toy_clip.embed_images(model, preprocess, [world.render(Item("green", "house", "sdsweep"), 1)])
    prompts = ["a green house, sdsweep style", "a blue house, sdsweep style", "a green tree, sdsweep style",
               "a green house, plain style"]  # right; wrong colour, wrong subject, wrong style
    scores = (image @ toy_clip.embed_texts(model, tokenizer, prompts).T)[0]
    assert (scores[0] > scores[1:] + 0.1).all(), scores


def test_toy_clip_image_embedding_separates_the_styles(clip):
    """What the style metrics rest on: styled pictures sit near the fine-tuning set's centroid, plain ones not."""
    model, preprocess, _ = clip
    reference = toy_clip.embed_images(model, preprocess, [world.render(it, seed) for it, seed in world.finetune_items()])
    centroid = torch.nn.functional.normalize(reference.mean(0), dim=0)
    held_out = [(c, s) for c, s in world.HELD_OUT_COMBOS]
    styled = toy_clip.embed_images(model, preprocess, [world.render(Item(c, s, "sdsweep"), 50) for c, s in held_out])
    plain = toy_clip.embed_images(model, preprocess, [world.render(Item(c, s), 50) for c, s in held_out])
    assert (styled @ centroid).min() > (plain @ centroid).max(), (styled @ centroid, plain @ centroid)


@pytest.mark.parametrize("prompt_set", ["in_distribution", "held_out"])
def test_base_model_draws_what_is_asked_in_its_own_plain_style(pipe, clip, prompt_set):
    """The eval prompts carry ", sdsweep style", which the base model never learned: it draws the
    asked-for colour and subject, plainly."""
    prompts = world.IN_DISTRIBUTION_PROMPTS if prompt_set == "in_distribution" else world.HELD_OUT_PROMPTS
    truth = [world.parse_prompt(p) for p in prompts for _ in SAMPLE_SEEDS]
    images = [sample(pipe, p, seed) for p in prompts for seed in SAMPLE_SEEDS]
    seen = toy_clip.classify(*clip, images)
    result = toy_clip.accuracy(seen, truth)
    assert result["colour"] >= 0.9 and result["subject"] >= 0.9, result
    assert all(item.style == "plain" for item in seen), seen

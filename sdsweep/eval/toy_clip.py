"""The toy CLIP: a small open_clip model trained contrastively on the toy world.

It knows what the toy world's pictures show: the colour, the subject and the style (plain or
"sdsweep style"), so CLIP score, style similarity and content similarity measure real properties
of toy images. It loads through open_clip's own path, as ViT-L-14 does: `add_model_config` for its
architecture, then `create_model_and_transforms(name, pretrained=<weights file>)`, and tokenizes
with open_clip's real CLIP tokenizer.

The shipped file (sdsweep/model/toy_weights/toy_clip.safetensors, fp16) holds every tensor but
the 49408-row token embedding, of which only the rows of the tokens the toy world's captions use
ship (`token_embedding.rows.ids`, `token_embedding.rows.weight`). The other rows never received a
gradient: they keep their initial values, N(0, 0.02) (open_clip's init) drawn from numpy's legacy
RandomState(TOKEN_FILL_SEED), and are drawn again when the full weights file is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdsweep.data.toy_world import COLOURS, STYLE_SUFFIX, SUBJECTS, Item

TOY_CLIP_NAME = "sdsweep-toy-clip"
TOY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
WEIGHTS_FILE = Path(__file__).parents[1] / "model" / "toy_weights" / "toy_clip.safetensors"
TOKEN_FILL_SEED = 7
_ROW_IDS, _ROW_WEIGHTS = "token_embedding.rows.ids", "token_embedding.rows.weight"


# --- what a text says about a picture ---------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """What a caption asserts: None for what it leaves open."""

    colour: str | None = None
    subject: str | None = None
    style: str | None = None

    @property
    def text(self) -> str:
        noun = self.subject or "picture"
        words = f"{self.colour} {noun}" if self.colour else noun
        article = "an" if words[0] in "aeiou" else "a"
        suffix = {None: "", "sdsweep": STYLE_SUFFIX, "plain": ", plain style"}[self.style]
        return f"{article} {words}{suffix}"

    def holds_for(self, item: Item) -> bool:
        return all(want is None or want == have for want, have in
                   ((self.colour, item.colour), (self.subject, item.subject), (self.style, item.style)))


def true_specs(item: Item) -> list[Spec]:
    """Every caption form that is true of `item`: the training captions of the toy CLIP."""
    return [Spec(c, s, st) for c in (item.colour, None) for s in (item.subject, None) for st in (item.style, None)]


# The zero-shot questions: one prompt per answer (the same caption forms the model was trained on)
COLOUR_PROMPTS = {c: Spec(colour=c).text for c in COLOURS}
SUBJECT_PROMPTS = {s: Spec(subject=s).text for s in SUBJECTS}
STYLE_PROMPTS = {"plain": Spec(style="plain").text, "sdsweep": Spec(style="sdsweep").text}


# --- weights ----------------------------------------------------------------------------------

def token_fill(vocab_size: int, width: int) -> torch.Tensor:
    """The token embedding's initial rows: N(0, 0.02) from numpy's RandomState(TOKEN_FILL_SEED)."""
    rng = np.random.RandomState(TOKEN_FILL_SEED)
    return torch.from_numpy(rng.standard_normal((vocab_size, width)).astype(np.float32) * np.float32(0.02))


def register_config(cache_dir: str | os.PathLike) -> None:
    """Make TOY_CLIP_NAME an open_clip model name (a config file under <cache_dir>/open_clip)."""
    import open_clip

    from sdsweep.io import atomic_write_json

    config_file = Path(cache_dir).expanduser() / "open_clip" / f"{TOY_CLIP_NAME}.json"
    if not config_file.exists() or json.loads(config_file.read_text()) != TOY_CLIP_CONFIG:
        atomic_write_json(config_file, TOY_CLIP_CONFIG)
    if TOY_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(config_file)


def new_toy_clip(cache_dir: str | os.PathLike) -> torch.nn.Module:
    """An untrained toy CLIP whose token embedding starts from `token_fill` (the training script's start)."""
    import open_clip

    register_config(cache_dir)
    model = open_clip.create_model(TOY_CLIP_NAME, pretrained=None)
    with torch.no_grad():
        model.token_embedding.weight.copy_(token_fill(*model.token_embedding.weight.shape))
    return model


def save_toy_clip(model: torch.nn.Module, path: Path, token_ids: list[int]) -> None:
    """The shipped form: fp16, with only rows `token_ids` of the token embedding."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.int64)
    state[_ROW_WEIGHTS] = state.pop("token_embedding.weight")[ids].contiguous()
    state[_ROW_IDS] = ids
    save_file(state, str(path))


def full_weights_file(cache_dir: str | os.PathLike, shipped: Path = WEIGHTS_FILE) -> Path:
    """A complete open_clip weights file (fp32) under <cache_dir>/open_clip, written once per shipped file."""
    from safetensors.torch import load_file, save

    from sdsweep.io import atomic_write_bytes

    digest = hashlib.sha256(Path(shipped).read_bytes()).hexdigest()[:12]
    target = Path(cache_dir).expanduser() / "open_clip" / f"{TOY_CLIP_NAME}-{digest}.safetensors"
    if target.exists():
        return target
    state = {k: v.float() for k, v in load_file(str(shipped)).items()}
    ids, rows = state.pop(_ROW_IDS).long(), state.pop(_ROW_WEIGHTS)
    text = TOY_CLIP_CONFIG["text_cfg"]
    embedding = token_fill(text["vocab_size"], text["width"])
    embedding[ids] = rows
    state["token_embedding.weight"] = embedding
    atomic_write_bytes(target, save(state))
    return target


def load_toy_clip(cache_dir: str | os.PathLike, shipped: Path = WEIGHTS_FILE) -> tuple[torch.nn.Module, object, object]:
    """(model, preprocess, tokenizer) of the trained toy CLIP, through open_clip's own loading path,
    in eval mode with gradients off. metrics.load_clip wraps these in its Clip."""
    import open_clip

    register_config(cache_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(
        TOY_CLIP_NAME, pretrained=str(full_weights_file(cache_dir, shipped)), require_pretrained=True)
    model.eval().requires_grad_(False)
    return model, preprocess, open_clip.get_tokenizer(TOY_CLIP_NAME)


# --- zero-shot --------------------------------------------------------------------------------

@torch.no_grad()
def embed_images(model, preprocess, images) -> torch.Tensor:
    pixels = torch.stack([preprocess(im) for im in images])
    return F.normalize(model.encode_image(pixels).float(), dim=-1)


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str]) -> torch.Tensor:
    return F.normalize(model.encode_text(tokenizer(texts)).float(), dim=-1)


def classify(model, preprocess, tokenizer, images) -> list[Item]:
    """What the toy CLIP sees in each PIL image: the nearest colour, subject and style prompt."""
    image_emb = embed_images(model, preprocess, images)
    answers = []
    for prompts in (COLOUR_PROMPTS, SUBJECT_PROMPTS, STYLE_PROMPTS):
        text_emb = embed_texts(model, tokenizer, list(prompts.values()))
        answers.append([list(prompts)[i] for i in (image_emb @ text_emb.T).argmax(dim=1).tolist()])
    return [Item(c, s, st) for c, s, st in zip(*answers)]


def accuracy(predicted: list[Item], truth: list[Item]) -> dict[str, float]:
    """Fractions right: colour, subject, style, and colour and subject together."""
    n = len(truth)
    return {
        "colour": sum(p.colour == t.colour for p, t in zip(predicted, truth)) / n,
        "subject": sum(p.subject == t.subject for p, t in zip(predicted, truth)) / n,
        "style": sum(p.style == t.style for p, t in zip(predicted, truth)) / n,
        "content": sum(p.colour == t.colour and p.subject == t.subject for p, t in zip(predicted, truth)) / n,
    }

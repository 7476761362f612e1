"""The real encoders load through the user's path, from local random-weight copies (offline).

DINOv2: a real `Dinov2Model` (tiny config: hidden 32, 2 layers, 2 heads, patch 14, 56 px) and a
`BitImageProcessor` config, written with save_pretrained, loaded by `load_dino` through
AutoModel/AutoImageProcessor.from_pretrained: from the folder, and from a Hugging Face cache laid out as a
download of facebook/dinov2-base leaves it (what a user who downloaded once has offline).

CLIP: the real ViT-L-14 architecture (428 M parameters, every layer) loaded by `metrics.load_clip` through
open_clip's `create_model_and_transforms("ViT-L-14", pretrained=<file>, require_pretrained=True)`. The file is
written once per session in fp16 (855 MB, deleted afterwards) from the parameter shapes of the model built
on the meta device, with seeded pseudo-random values, so writing it costs about 2 s instead of the 5 s a random
initialisation of 428 M parameters takes; loading it (open_clip builds and initialises the model, then
loads the file, strict) costs about 4.5 s on one core, encoding one image at 224 px about 1.5 s.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdsweep.eval import dino as dino_mod
from sdsweep.eval.clip_weights import clip_problem
from sdsweep.eval.dino import DEFAULT_DINO, DinoLoadError, dino_problem, load_dino

CPU = torch.device("cpu")


def _images() -> list[Image.Image]:
    grad = Image.linear_gradient("L").resize((80, 70)).convert("RGB")
    return [Image.new("RGB", (64, 64), (220, 30, 30)), Image.new("RGB", (90, 60), (20, 40, 200)), grad,
            Image.new("L", (64, 64), 128)]  # a greyscale image: converted to RGB


# --- DINOv2 -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    folder = tmp_path_factory.mktemp("dinov2-tiny")
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                          patch_size=14, image_size=56)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        Dinov2Model(config).save_pretrained(folder)
    # dinov2-base's own processor settings (shortest edge 256 -> crop 224, ImageNet statistics), scaled to 56 px
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                      image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD).save_pretrained(folder)
    return folder


@pytest.fixture
def fresh_dino_cache():
    """load_dino keeps models per process: each test loads from disk."""
    saved = dict(dino_mod._DINO_CACHE)
    dino_mod._DINO_CACHE.clear()
    yield
    dino_mod._DINO_CACHE.clear()
    dino_mod._DINO_CACHE.update(saved)


def test_dino_loads_folder_through_auto_classes(dino_folder, tmp_path, fresh_dino_cache):
    from transformers import Dinov2Model

    assert dino_problem(str(dino_folder), tmp_path) is None
    dino = load_dino(str(dino_folder), tmp_path)
    assert isinstance(dino.model, Dinov2Model) and type(dino.processor).__name__.startswith("BitImageProcessor")
    assert dino.dim == 32 and not dino.model.training
    saved = Dinov2Model.from_pretrained(dino_folder)
    assert torch.equal(dino.model.embeddings.cls_token, saved.embeddings.cls_token)  # the file's weights

    images = _images()
    emb = dino.encode_images(images, CPU)
    assert emb.shape == (4, 32) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    # the processor's own resize / crop / normalise, then the CLS token after the final layer norm
    pixels = dino.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (4, 3, 56, 56)
    with torch.no_grad():
        cls = saved(pixel_values=pixels).last_hidden_state[:, 0]
    assert torch.allclose(emb, torch.nn.functional.normalize(cls, dim=-1), atol=1e-5)
    # deterministic, batched the same, distinct images give distinct features
    assert torch.equal(emb, dino.encode_images(images, CPU))
    assert torch.allclose(emb, dino.encode_images(images, CPU, batch=3), atol=1e-6)
    off_diagonal = (emb @ emb.T)[~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.max() < 0.999, off_diagonal
    assert not dino.model.embeddings.cls_token.requires_grad
    assert load_dino(str(dino_folder), tmp_path) is dino  # once per process


def test_dino_from_hub_cache_offline(dino_folder, tmp_path, fresh_dino_cache):
    """A cache as a download of facebook/dinov2-base leaves it: offline, load_dino finds it by its hub id."""
    snapshot = tmp_path / f"models--{DEFAULT_DINO.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(dino_folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    assert dino_problem(DEFAULT_DINO, tmp_path) is None
    dino = load_dino(DEFAULT_DINO, tmp_path)
    assert dino.encode_images(_images()[:2], CPU).shape == (2, 32)
    (snapshot / "model.safetensors").unlink()  # an interrupted download
    problem = dino_problem(DEFAULT_DINO, tmp_path)
    assert problem and "missing the weights" in problem


def test_dino_missing_weights_fail_with_the_fix(tmp_path, dino_folder, fresh_dino_cache):
    empty = tmp_path / "hf-cache"
    empty.mkdir()
    # a hub id that is not cached, offline (conftest sets HF_HUB_OFFLINE=1)
    problem = dino_problem(DEFAULT_DINO, empty)
    with pytest.raises(DinoLoadError) as e:
        load_dino(DEFAULT_DINO, empty)
    for text in (problem, str(e.value)):
        assert text and "~350 MB" in text and str(empty) in text and "eval.dino_model=none" in text
        assert f"AutoModel.from_pretrained('{DEFAULT_DINO}', cache_dir='{empty}')" in text
        assert "eval.dino_model=<local folder>" in text
    assert dino_problem(DEFAULT_DINO, empty, offline=False) is None  # online: downloaded on first use
    # a folder that is not there: the same message before launch and at load
    missing = str(tmp_path / "no-such-dino")
    with pytest.raises(DinoLoadError) as e:
        load_dino(missing, empty)
    assert str(e.value) == dino_problem(missing, empty) and "no such folder" in str(e.value)
    assert f"eval.dino_model={DEFAULT_DINO}" in str(e.value)
    # a folder without its processor config
    broken = tmp_path / "broken"
    shutil.copytree(dino_folder, broken)
    (broken / "preprocessor_config.json").unlink()
    assert "preprocessor_config.json" in dino_problem(str(broken), empty)
    with pytest.raises(DinoLoadError, match="preprocessor_config.json"):
        load_dino(str(broken), empty)
    # DINO switched off
    assert dino_problem("none", empty) is None and dino_problem(None, empty) is None


def test_dino_sharded_folder_is_complete_only_with_all_shards(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json", "model-00001-of-00002.safetensors"):
        (folder / name).write_text("{}")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert "model-00002-of-00002.safetensors" in dino_problem(str(folder), tmp_path)
    (folder / "model-00002-of-00002.safetensors").write_text("{}")
    assert dino_problem(str(folder), tmp_path) is None


# --- CLIP ViT-L-14 ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def vit_l14_file(tmp_path_factory):
    """A ViT-L-14 open_clip weights file (fp16 safetensors) with seeded pseudo-random values; removed after."""
    import open_clip
    from safetensors.torch import save_file

    with torch.device("meta"):  # shapes only: no 428 M-parameter random initialisation (5 s)
        model = open_clip.create_model("ViT-L-14", pretrained=None, device="meta")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    window = 1 << 22
    pool = (torch.randn(window + 65536, generator=torch.Generator().manual_seed(0)) * 0.02).half()
    tensors, offset = {}, 0
    for key, shape in shapes.items():
        n = shape.numel()
        if key.endswith("bias"):
            tensors[key] = torch.zeros(shape, dtype=torch.float16)
        elif len(shape) == 1 and ("ln" in key or "norm" in key):
            tensors[key] = torch.ones(shape, dtype=torch.float16)
        else:  # a window of the pool, shifted per tensor by a prime, tiled to the tensor's size
            start = offset % 65521
            tensors[key] = pool[start : start + window].repeat(-(-n // window))[:n].view(shape)
            offset += 7919
    path = tmp_path_factory.mktemp("vit-l-14") / "open_clip_model.safetensors"
    save_file(tensors, str(path))
    probe = {k: tensors[k].clone() for k in ("visual.conv1.weight", "token_embedding.weight")}
    del tensors, pool
    yield path, probe, sum(s.numel() for s in shapes.values())
    path.unlink(missing_ok=True)


def test_vit_l14_loads_local_file_through_load_clip(vit_l14_file, tmp_path, monkeypatch):
    from sdsweep.eval import metrics

    path, probe, n_params = vit_l14_file
    assert n_params > 427e6  # the real architecture, every layer
    assert clip_problem("ViT-L-14", str(path), tmp_path) is None
    key = ("ViT-L-14", str(path))
    try:
        with monkeypatch.context() as m:
            # open_clip initialises all 428 M parameters at random (4 s on one core) before the strict
            # load overwrites every one of them: skip the draws, nothing else of the path changes
            for draw in ("uniform_", "normal_"):
                m.setattr(torch.Tensor, draw, lambda self, *args, **kwargs: self)
            clip = metrics.load_clip("ViT-L-14", str(path), tmp_path)
        assert clip.name == f"ViT-L-14/{path}"
        params = dict(clip.model.named_parameters())
        for name, value in probe.items():  # the file's values, not open_clip's random initialisation
            assert torch.equal(params[name].detach(), value.float())
        img = clip.encode_images(_images()[:1], CPU)
        txt = clip.encode_texts(["a red square, sdsweep style"], CPU)
        assert img.shape == txt.shape == (1, 768)
        assert torch.allclose(img.norm(dim=-1), torch.ones(1)) and torch.isfinite(txt).all()
    finally:
        metrics._CLIP_CACHE.pop(key, None)  # 1.7 GB in fp32: not kept for the rest of the session


def _fake_hub_file(cache: Path, repo: str, filename: str) -> Path:
    """A file laid out in a Hugging Face cache as hf_hub_download leaves it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    target = root / "snapshots" / ("1" * 40) / filename
    target.parent.mkdir(parents=True)
    target.write_bytes(b"weights")
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("1" * 40)
    return target


def test_clip_problem_vit_l14_openai(tmp_path):
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    empty = tmp_path / "hub"
    empty.mkdir()
    for problem in (clip_problem("ViT-L-14", "openai", tmp_path, download_dir=empty),  # HF_HUB_OFFLINE=1
                    clip_problem("ViT-L-14", "openai", tmp_path, download_dir=empty, offline=True)):
        assert problem and "~1.7 GB" in problem and str(empty) in problem
        assert "create_model_and_transforms('ViT-L-14', pretrained='openai'" in problem
        assert "eval.clip_pretrained=<local file>" in problem
        assert "eval.clip_model=toy|tiny" in problem and "eval.allow_stand_in=true" in problem
    assert clip_problem("ViT-L-14", "openai", tmp_path, download_dir=empty, offline=False) is None
    # once downloaded, the file clip_problem accepts is the one open_clip itself resolves offline
    cached = _fake_hub_file(empty, "timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors")
    assert clip_problem("ViT-L-14", "openai", tmp_path, download_dir=empty) is None
    assert Path(download_pretrained(get_pretrained_cfg("ViT-L-14", "openai"), cache_dir=str(empty))) == cached


def test_clip_problem_other_cases(tmp_path, vit_l14_file):
    path, _, _ = vit_l14_file
    assert clip_problem("toy", None, tmp_path) is None and clip_problem("tiny", None, tmp_path) is None
    assert clip_problem("ViT-L-14", str(path), tmp_path) is None
    assert "neither a file nor a tag" in clip_problem("ViT-L-14", str(tmp_path / "nope.safetensors"), tmp_path)
    assert "no weights given" in clip_problem("ViT-L-14", None, tmp_path)
    assert "not an open_clip model" in clip_problem("ViT-Q-99", "openai", tmp_path)
    hub = tmp_path / "hub"
    hub.mkdir()
    problem = clip_problem("hf-hub:someone/clip", None, tmp_path, download_dir=hub, offline=True)
    assert "open_clip_config.json" in problem and "the weights" in problem
    folder = tmp_path / "local"
    folder.mkdir()
    assert "open_clip_config.json" in clip_problem(f"local-dir:{folder}", None, tmp_path)
    (folder / "open_clip_config.json").write_text("{}")
    assert "no weights file" in clip_problem(f"local-dir:{folder}", None, tmp_path)
    (folder / "open_clip_model.safetensors").write_bytes(b"w")
    assert clip_problem(f"local-dir:{folder}", None, tmp_path) is None

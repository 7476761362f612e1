"""Before launch: will open_clip find the CLIP weights offline? A cheap check, no model is built.

`sdsweep.eval.metrics.load_clip(model_name, pretrained, cache_dir)` calls
`open_clip.create_model_and_transforms(model_name, pretrained=..., require_pretrained=True)` with no
`cache_dir` of its own, so open_clip resolves `pretrained` as it always does (open_clip/pretrained.py,
`download_pretrained`, and factory.py, `create_model`):

  a tag of the model (`openai`, `laion2b_s32b_b82k`; tags win over files of the same name)
      with `huggingface_hub` installed and the tag on the hub (most, `openai` included): the hub repo's
      open_clip_model.safetensors, else open_clip_pytorch_model.bin, in the Hugging Face cache
      (~/.cache/huggingface/hub or $HF_HUB_CACHE); otherwise the tag's URL, saved as ~/.cache/clip/<file>
  a local file                      loaded as it is
  `hf-hub:org/repo` as the model    open_clip_config.json and the weights of that repo, in the hub cache
  `local-dir:/folder` as the model  open_clip_config.json and a weights file in the folder

ViT-L-14/openai, the default for a real model, is 428 M parameters: ~1.7 GB (fp32) from
timm/vit_large_patch14_clip_224.openai on the hub (OpenAI's own fp16 ViT-L-14.pt, ~890 MB, is only used
without huggingface_hub).
"""

from __future__ import annotations

import os
from pathlib import Path

STAND_INS = ("toy", "tiny")
REAL_CLIP = ("ViT-L-14", "openai")
SIZES = {("ViT-L-14", "openai"): "~1.7 GB (428 M parameters in fp32; OpenAI's fp16 original is ~890 MB)"}
HF_HUB_PREFIX, LOCAL_DIR_PREFIX = "hf-hub:", "local-dir:"


def _offline() -> bool:
    """HF_HUB_OFFLINE as the hub library and sdsweep's model loading read it."""
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:
        pass
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false")


def download_command(model_name: str, pretrained: str | None, download_dir=None) -> str:
    """The one-liner that downloads (model_name, pretrained) to where open_clip looks for it."""
    args = f"{model_name!r}" + (f", pretrained={pretrained!r}" if pretrained else "")
    if download_dir is not None:
        args += f", cache_dir={str(Path(download_dir).expanduser())!r}"
    return f'python -c "import open_clip; open_clip.create_model_and_transforms({args})"'


def fix_message(model_name: str, pretrained: str | None, why: str, where: str | None = None,
                download_dir=None, is_tag: bool = True) -> str:
    """What is wrong with (eval.clip_model, eval.clip_pretrained), and every way out. `is_tag`: the pair names
    a download; otherwise the download offered is the default for a real model, ViT-L-14/openai."""
    get = (model_name, pretrained) if is_tag else REAL_CLIP
    size = SIZES.get((get[0], (get[1] or "").lower()), "its weights")
    if where is None and not is_tag:
        where = _hub_cache_text(download_dir)
    where = f" to {where}" if where else ""
    download = f"run once online `{download_command(*get, download_dir)}` to download {size}{where}"
    if not is_tag:
        download = f"use eval.clip_model={get[0]} eval.clip_pretrained={get[1]} and {download}"
    return (
        f"eval.clip_model={model_name} eval.clip_pretrained={pretrained}: {why}. Fix: {download}; or set "
        "eval.clip_pretrained=<local file> (an open_clip weights file of this architecture, .safetensors/.bin/.pt); "
        "or eval.clip_model=toy|tiny eval.clip_pretrained=null eval.allow_stand_in=true to score with a stand-in "
        "(its numbers say nothing about real images; every leaderboard row then names it)"
    )


def _hub_cached(repo_id: str, filename: str, download_dir) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, filename, cache_dir=download_dir)
    except Exception:  # noqa: BLE001 - an id the hub library refuses (HFValidationError)
        return None
    return hit if isinstance(hit, str) else None


def _hub_weights_cached(repo_id: str, filename: str | None, download_dir) -> bool:
    """open_clip's download_pretrained_from_hf: the safetensors alternative of `filename` first, then it."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    filename = filename or HF_WEIGHTS_NAME
    candidates = [filename]
    if filename == HF_WEIGHTS_NAME:
        candidates.insert(0, HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        candidates.insert(0, filename[:-4] + ".safetensors")
    return any(_hub_cached(repo_id, c, download_dir) for c in candidates)


def _hub_cache_text(download_dir) -> str:
    if download_dir is not None:
        return str(Path(download_dir).expanduser())
    from huggingface_hub import constants

    return f"the Hugging Face cache ({constants.HF_HUB_CACHE})"


def clip_problem(model_name: str, pretrained: str | None, cache_dir=None, *, download_dir=None,
                 offline: bool | None = None) -> str | None:
    """Why `metrics.load_clip(model_name, pretrained, cache_dir)` would not find its weights, with the fix; None
    when it will (or when open_clip would download them: online, `offline=False`).

    `cache_dir` is sdsweep's, as load_clip's (it holds only the stand-ins `toy` and `tiny`, which need no
    download); `download_dir` is the `cache_dir` given to open_clip, None for its defaults, which is what
    load_clip uses. `offline=None` reads HF_HUB_OFFLINE: online, a hub or URL tag not yet downloaded is not a
    problem (it downloads on first use, like the base model); offline it must be in the cache already.
    Local files and folders are checked either way."""
    del cache_dir  # the stand-ins build from code or ship with the package
    if model_name in STAND_INS:
        return None
    if offline is None:
        offline = _offline()
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    if model_name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(model_name[len(LOCAL_DIR_PREFIX):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            return fix_message(model_name, pretrained, f"{folder} has no open_clip_config.json", is_tag=False)
        if not any(any(folder.glob(f"*{ext}")) for ext in (".safetensors", ".bin", ".pth")):
            return fix_message(model_name, pretrained, f"{folder} has no weights file (.safetensors, .bin, .pth)",
                               is_tag=False)
        return None
    if model_name.startswith(HF_HUB_PREFIX):
        repo = model_name[len(HF_HUB_PREFIX):]
        if not offline:
            return None
        missing = [what for what, ok in (
            ("open_clip_config.json", _hub_cached(repo, "open_clip_config.json", download_dir)),
            ("the weights", _hub_weights_cached(repo, None, download_dir))) if not ok]
        if missing:
            return fix_message(model_name, None, f"HF_HUB_OFFLINE is set and {repo} is not in "
                               f"{_hub_cache_text(download_dir)} (missing {', '.join(missing)})",
                               _hub_cache_text(download_dir), download_dir)
        return None

    arch = model_name.replace("/", "-")
    if arch not in open_clip.list_models():
        return fix_message(model_name, pretrained, "not an open_clip model (open_clip.list_models() names them)",
                           is_tag=False)
    if not pretrained:
        return fix_message(model_name, pretrained, "no weights given (sdsweep never scores with random weights "
                           "of a real architecture)", is_tag=False)
    tag_cfg = get_pretrained_cfg(arch, pretrained)
    if not tag_cfg:  # not a tag: must be a file (load_clip expands ~)
        path = Path(os.path.expanduser(pretrained))
        if path.is_file():
            return None
        tags = ", ".join(list_pretrained_tags_by_model(arch)) or "none"
        return fix_message(model_name, pretrained, f"neither a file nor a tag of {arch} (its tags: {tags})",
                           is_tag=False)
    if "file" in tag_cfg:  # a tag registered with a local file
        return None if Path(tag_cfg["file"]).is_file() else fix_message(
            model_name, pretrained, f"its registered file {tag_cfg['file']} does not exist", is_tag=False)
    if not offline:
        return None
    from open_clip.pretrained import has_hf_hub

    hub, url = tag_cfg.get("hf_hub", ""), tag_cfg.get("url", "")
    if hub and has_hf_hub():
        repo, filename = os.path.split(hub)
        if _hub_weights_cached(repo, filename or None, download_dir):
            return None
        where = _hub_cache_text(download_dir)
        return fix_message(model_name, pretrained, f"HF_HUB_OFFLINE is set and its weights ({repo}) are not in {where}",
                           where, download_dir)
    if url:
        folder = Path(download_dir).expanduser() if download_dir is not None else Path("~/.cache/clip").expanduser()
        target = folder / os.path.basename(url)
        if target.is_file():
            return None
        return fix_message(model_name, pretrained, f"offline and {target} is not downloaded yet", str(folder),
                           download_dir)
    return fix_message(model_name, pretrained, "the tag names no download", is_tag=False)

"""adapter=textual_inversion: new token embeddings trained in each CLIP text encoder, nothing else.

Textual inversion (Gal et al. 2022) as diffusers' `examples/textual_inversion` trains it: the
placeholder `adapter.token` (and `<token>_1` ... for `adapter.num_vectors` > 1, the names diffusers'
loader gives extra vectors) is added to each tokenizer, its embedding rows start as the embedding of
`adapter.initializer_token`, and only those rows train: the gradient of every other row is zeroed and,
after each step, the rows weight decay moved are put back, so the encoder is the base's bit for bit
for every prompt without the token. The trigger goes into every caption that lacks it (and into the
trial's evaluation prompts): without it the embedding would never be read.

Saved as one safetensors file in the format A1111/ComfyUI embeddings use and diffusers'
`load_textual_inversion` reads: SD1.5 `{"emb_params": (n, 768)}`, SDXL `{"clip_l": (n, 768),
"clip_g": (n, 1280)}` (loaded per encoder with `token=`, `text_encoder=`, `tokenizer=`). No library
trains textual inversion as a module (peft has no such tuner; diffusers' is a script): this is that
script's rule, written against our Components.
"""

from __future__ import annotations

from pathlib import Path

import torch

KIND = "textual_inversion"
EMBEDDINGS = "learned_embeds.safetensors"  # diffusers' textual_inversion script writes this name
FILE_KEYS = {"sd15": ("emb_params",), "sdxl": ("clip_l", "clip_g")}


class TextualInversionError(ValueError):
    """The token or initializer cannot be used with this model's tokenizers."""


def placeholder_tokens(adapter) -> list[str]:
    """`<token>`, `<token>_1`, ...: one per vector, the names diffusers' loader gives a multi-vector embedding."""
    return [adapter.token] + [f"{adapter.token}_{i}" for i in range(1, adapter.num_vectors)]


def with_token(text: str, token: str) -> str:
    """`text` with the trigger: as it is when it already names it, else the trigger first."""
    return text if token in text.split() else f"{token} {text}".strip()


def expanded(text: str, adapter) -> str:
    """A caption as the encoder must read it: the trigger in, spelled as all its vectors (what diffusers'
    maybe_convert_prompt does to a pipeline's prompt)."""
    words = [" ".join(placeholder_tokens(adapter)) if w == adapter.token else w
             for w in with_token(text, adapter.token).split(" ")]
    return " ".join(words)


def attach(tokenizers: list, encoders: list[torch.nn.Module], adapter) -> list[torch.nn.Module]:
    """Add the placeholder tokens to each (tokenizer, CLIP encoder), initialised from adapter.initializer_token,
    and make their rows the only trainable weights. Returns the encoders, which now train."""
    tokens = placeholder_tokens(adapter)
    for tokenizer, encoder in zip(tokenizers, encoders):
        init = tokenizer.encode(adapter.initializer_token, add_special_tokens=False)
        if len(init) != 1:
            raise TextualInversionError(
                f"adapter.initializer_token={adapter.initializer_token!r} is {len(init)} tokens for the tokenizer, "
                "not one: pick a single common word close to the concept (style, painting, person, object)")
        # a word the tokenizer reads as one token ("house") would be taken over in every caption that says it
        word = len(tokenizer.encode(adapter.token, add_special_tokens=False)) == 1
        if word or tokenizer.add_tokens(tokens) != len(tokens):
            raise TextualInversionError(
                f"adapter.token={adapter.token!r} (or one of {tokens}) is already in the tokenizer's vocabulary, so "
                "training it would change a word the model knows: pick a new one, e.g. adapter.token='<my-style>'")
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the rows are set just below
        _train_rows(encoder, tokenizer.convert_tokens_to_ids(tokens), init[0])
    return list(encoders)


def _train_rows(encoder: torch.nn.Module, ids: list[int], init_id: int) -> None:
    weight = encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight.data = weight.data.float()  # trains in fp32 whatever the base's dtype, as the adapters do
        weight[ids] = weight[init_id].clone()
    trained = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
    trained[ids] = True
    encoder._sdsweep_ti = {"ids": ids, "mask": trained, "frozen": weight.detach().clone()}
    weight.requires_grad_(True)
    # only the new rows learn: the other rows of the caption's words get no gradient (so neither Adam's
    # moments nor the clipped norm see them)
    weight.register_hook(lambda grad: grad * trained.to(grad.dtype))


def trained_count(encoders: list[torch.nn.Module], adapter) -> int:
    """The numbers that train: num_vectors rows of each encoder's embedding (not the whole matrix they live in)."""
    return sum(adapter.num_vectors * encoder.get_input_embeddings().weight.shape[1] for encoder in encoders)


def restore_frozen_rows(encoders: list[torch.nn.Module]) -> None:
    """After an optimizer step: the rows weight decay moved are the base's again (diffusers' index_no_updates)."""
    with torch.no_grad():
        for encoder in encoders:
            state = encoder._sdsweep_ti
            weight = encoder.get_input_embeddings().weight
            weight.copy_(torch.where(state["mask"], weight, state["frozen"]))


def save(folder: Path, family: str, tokenizers: list, encoders: list[torch.nn.Module], adapter) -> Path:
    """The learned vectors, in the A1111/ComfyUI layout that diffusers' load_textual_inversion reads."""
    from safetensors.torch import save_file

    tokens = placeholder_tokens(adapter)
    tensors = {key: encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(tokens)].detach().float().cpu()
               for key, tokenizer, encoder in zip(FILE_KEYS[family], tokenizers, encoders)}
    path = Path(folder) / EMBEDDINGS
    save_file(tensors, path, metadata={"token": adapter.token, "num_vectors": str(adapter.num_vectors)})
    return path


def pipeline_encoders(pipe) -> list[tuple]:
    """(tokenizer, text encoder) of each CLIP encoder of a pipeline, in FILE_KEYS order."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def remove(pipe, adapter) -> None:
    """Take trained tokens out of a pipeline's tokenizers and encoders (diffusers' unload_textual_inversion):
    what is left is the base model."""
    tokens = placeholder_tokens(adapter)
    for tokenizer, encoder in pipeline_encoders(pipe):
        if adapter.token in tokenizer.get_vocab():
            pipe.unload_textual_inversion(tokens=tokens, tokenizer=tokenizer, text_encoder=encoder)


def load(pipe, folder: Path) -> None:
    """The saved embedding into a pipeline, the way a user loads it (one call per encoder for SDXL), under
    the token `save` wrote into the file's metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / EMBEDDINGS
    with safe_open(str(path), framework="pt") as f:
        token = f.metadata()["token"]
    pairs = pipeline_encoders(pipe)
    if len(pairs) == 1:
        pipe.load_textual_inversion(str(path), token=token)
        return
    state = load_file(path)
    for key, (tokenizer, encoder) in zip(FILE_KEYS["sdxl"], pairs):
        pipe.load_textual_inversion(state[key], token=token, text_encoder=encoder, tokenizer=tokenizer)

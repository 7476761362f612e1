"""A trial's adapter in the formats people load: kohya/LyCORIS (ComfyUI, A1111/Forge), diffusers, peft, and
fused into its base model as one checkpoint; plus its Hugging Face model card.

    python -m sdsweep.export TRIAL_DIR --format kohya|diffusers|peft|merged [--out PATH]

Every trial already writes `adapter/kohya.safetensors` and `adapter/README.md` when it saves its adapter
(model/adapters.py:save_adapter calls kohya.write_kohya and card.write_card); this command makes the same
files on demand, from the adapter folder alone, for trials saved before those existed too.

  names.py   diffusers module names -> kohya names and the original (LDM/SGM) checkpoint layout
  kohya.py   peft tensors -> kohya/LyCORIS tensors (scales baked where the formats disagree), metadata
  saved.py   the adapter as export reads it: from live modules or from the saved files
  merge.py   the adapter fused into its base, written as a single-file checkpoint
  card.py    adapter/README.md
  trial.py   opening TRIAL_DIR, with errors that say what to give instead
"""

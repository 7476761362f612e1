"""The CLI freezes the imported libraries out of the garbage collector's scans before its first trial
(sdsweep/sweep/collector.py): once, never with a model loaded, and what a trial makes is still collected."""

from __future__ import annotations

import gc
import sys
import weakref

import pytest
import torch

from sdsweep.model import kept_base
from sdsweep.sweep import collector


@pytest.fixture
def unfrozen(monkeypatch):
    """This worker as a fresh CLI process sees it: nothing frozen (the worker is frozen again afterwards)."""
    monkeypatch.setattr(collector, "_frozen", False)
    gc.unfreeze()
    yield
    gc.collect()
    gc.freeze()


def test_the_first_trial_freezes_its_libraries_once_and_later_garbage_is_still_collected(make_cfg, unfrozen):
    cfg = make_cfg()
    assert gc.get_freeze_count() == 0

    assert collector.freeze_libraries(cfg) is True
    assert gc.get_freeze_count() > 100_000  # the libraries' objects
    assert all(name in sys.modules for name in collector.libraries(cfg))
    assert collector.freeze_libraries(cfg) is False  # once per process
    gc.unfreeze()
    assert collector.freeze_libraries(cfg) is False and gc.get_freeze_count() == 0  # without counting again
    gc.freeze()

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # a reference cycle: only a collection frees it
    a.weights = torch.zeros(1000)
    alive = weakref.ref(a.weights)
    del a, b
    gc.collect()
    assert alive() is None
    # what a collection still scans: a small part of what it scanned before the freeze
    assert len(gc.get_objects()) < gc.get_freeze_count() / 3


def test_nothing_is_frozen_while_a_base_model_is_kept(make_cfg, unfrozen, monkeypatch):
    monkeypatch.setattr(kept_base, "_kept", {"key": "k", "components": object()})
    assert collector.freeze_libraries(make_cfg()) is False
    assert gc.get_freeze_count() == 0


def test_the_libraries_imported_first_follow_the_config(make_cfg):
    plain = collector.libraries(make_cfg())
    assert collector.PIPELINES["sdxl"] in plain and "open_clip" not in plain and "wandb" not in plain
    assert {"open_clip", "torchmetrics.image"} <= set(collector.libraries(make_cfg(evaluate=True)))
    weight_free = collector.libraries(make_cfg("eval.metrics=[random_style]", evaluate=True))
    assert "open_clip" not in weight_free and "torchmetrics.image" not in weight_free  # never imported by it
    assert "wandb" in collector.libraries(make_cfg("tracking.mode=offline"))
    assert "prodigyopt" in collector.libraries(make_cfg("optimizer=prodigy"))
    sd3 = collector.libraries(make_cfg("model=tiny-sd3"))
    assert collector.PIPELINES["sd3"] in sd3 and "transformers.models.t5.modeling_t5" in sd3
    everything = set(collector.libraries(None))
    assert set(plain) | set(sd3) <= everything

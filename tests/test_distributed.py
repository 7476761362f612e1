"""One trial on several processes: `accelerate launch --multi_gpu --num_processes N -m sdsweep`.

On this CPU-only machine accelerate runs the same launch as MULTI_CPU with gloo: the data
sharding, the loss reduction, the gradient sync and the main-process-only writes are the
ones a multi-GPU launch uses (only the collective backend differs: nccl there).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import cli_env

from sdsweep.__main__ import _multiprocess_problem
from sdsweep.data.dataset import StepSampler

gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_multi_process_launch_needs_one_folder_and_one_trial(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "hydra.run.dir" in _multiprocess_problem(["train.max_steps=2"])
    assert "-m" in _multiprocess_problem(["-m", "adapter=lora,dora", "hydra.run.dir=x"])
    assert _multiprocess_problem(["hydra.run.dir=runs/x"]) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _multiprocess_problem(["-m", "adapter=lora,dora"]) is None


@gloo
@pytest.mark.slow
def test_two_processes_train_one_trial_on_disjoint_shares_of_each_batch(cache_dir, tmp_path):
    out = tmp_path / "run"
    # text_encoder=lora: its adapters are outside the DDP-wrapped unet, so they are synced by hand;
    # a checkpoint at a step that logs nothing: every process must still join the flush before it
    args = [f"hydra.run.dir={out}", f"model.cache_dir={cache_dir}", "train.max_steps=2", "train.batch_size=1",
            "train.log_every=2", "train.checkpoint_every=1", "text_encoder=lora", "eval.enabled=false", "tracking.mode=disabled", "debug.trace_data=true"]
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(_free_port()), "-m", "sdsweep", *args],
        env=cli_env(cache_dir), cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / "debug" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["processes"] == 2, elapsed

    # each process trained on its own samples; together exactly the samples (and crops, flips)
    # one process with twice the batch would have drawn, in the same order
    keys = [[tuple(k) for k in r["keys"]] for r in ranks]
    assert not set(keys[0]) & set(keys[1])
    n = metrics["data"]["images"]
    one_process = [k for k, _ in zip(StepSampler(n, seed=0), range(4))]
    assert [k for step in range(2) for k in (keys[0][step], keys[1][step])] == one_process

    # the trial's loss is the mean over the processes, logged once (by rank 0)
    assert metrics["losses"] == pytest.approx([(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])])
    assert ranks[0]["losses"] != pytest.approx(ranks[1]["losses"])
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2
    # gradients were averaged, unet (DDP) and text encoders alike: both ended with the same weights,
    # and the one adapter on disk is theirs
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert (out / "adapter" / "pytorch_lora_weights.safetensors").exists()
    assert "trial finished" in result.stdout + result.stderr


def test_shards_of_bucketed_batches_interleave_into_the_single_process_stream():
    from sdsweep.data.dataset import BucketBatchSampler, Shard

    targets = [(64, 64)] * 5 + [(48, 80)] * 3
    one = [b for b, _ in zip(BucketBatchSampler(targets, 2, seed=3, start=4), range(8))]
    shards = [[b for b, _ in zip(Shard(BucketBatchSampler(targets, 2, seed=3, start=4), 1, r, 2), range(4))]
              for r in (0, 1)]
    assert [b for pair in zip(*shards) for b in pair] == one

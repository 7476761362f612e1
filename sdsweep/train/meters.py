"""Speed and memory figures of a trial, named so that dashboards line them up across trials."""

from __future__ import annotations

import time

import psutil
import torch


class MemoryMeter:
    """Peak memory since the last reading, and overall.

    On CUDA, torch's peak counters are reset after every reading (and at the start of the
    trial: Hydra's basic launcher runs every trial in one process, and without the reset each
    trial would report its predecessor's peak); the overall peak is the max of the readings.
    On a CPU there is no peak counter: process RSS is sampled at every reading.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.overall: dict[str, float] = {}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def read(self) -> dict[str, float]:
        gb = 2**30
        if self.cuda:
            now = {
                "sys/peak_vram_allocated_gb": torch.cuda.max_memory_allocated() / gb,
                "sys/peak_vram_reserved_gb": torch.cuda.max_memory_reserved() / gb,
            }
            torch.cuda.reset_peak_memory_stats()
        else:
            now = {"sys/rss_gb": psutil.Process().memory_info().rss / gb}
        for key, value in now.items():
            self.overall[key] = max(self.overall.get(key, 0.0), value)
        return {**now, **{k.replace("sys/", "sys/max_"): v for k, v in self.overall.items()}}

    def summary_mb(self) -> dict[str, float | None]:
        self.read()
        o = self.overall
        if self.cuda:
            return {"peak_vram_mb": o["sys/peak_vram_allocated_gb"] * 1024,
                    "peak_vram_reserved_mb": o["sys/peak_vram_reserved_gb"] * 1024,
                    "peak_memory_mb": o["sys/peak_vram_allocated_gb"] * 1024}
        return {"peak_vram_mb": None, "peak_rss_mb": o["sys/rss_gb"] * 1024, "peak_memory_mb": o["sys/rss_gb"] * 1024}


class SpeedMeter:
    """Step time over each logging interval; averages leave out the first `warmup` steps,
    which pay for lazy initialisation (cuDNN autotuning, allocator growth, compilation)."""

    def __init__(self, warmup: int, samples_per_step: int):
        self.warmup, self.samples_per_step = warmup, samples_per_step
        self.last_time, self.last_step = time.perf_counter(), None
        self.timed_steps, self.timed_s = 0, 0.0

    def read(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        first = self.last_step if self.last_step is not None else step - 1
        steps, elapsed = step - first, now - self.last_time
        self.last_time, self.last_step = now, step
        if first >= self.warmup_until:
            self.timed_steps += steps
            self.timed_s += elapsed
        step_time = elapsed / max(steps, 1)
        return {"perf/step_time_s": step_time, "perf/it_per_s": 1 / step_time,
                "perf/images_per_s": self.samples_per_step / step_time}

    def start(self, first_step: int) -> None:
        self.last_time, self.last_step = time.perf_counter(), first_step
        self.warmup_until = first_step + self.warmup

    def summary(self) -> dict[str, float | None]:
        if not self.timed_steps:
            return {"steps_per_s": None, "images_per_s": None}
        rate = self.timed_steps / self.timed_s
        return {"steps_per_s": rate, "images_per_s": rate * self.samples_per_step}

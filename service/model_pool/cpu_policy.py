"""How inference uses the device: batch size, forward passes at once, and torch's threads.

Measured choices (bench/RESULTS.md) that depend only on the device and the cores this process
may use; kept apart from the pool, whose job is loading and evicting, not tuning.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from encoders.encoder import pick_device
from service.settings import Settings

logger = logging.getLogger(__name__)


def on_cuda(device: str) -> bool:
    return pick_device(device).startswith("cuda")


def default_batch_size(device: str) -> int:
    """Small batches on the CPU: after sorting by length, a forward pass of 16 wastes less on
    padding than one of 64 and costs no more per input (measured, see DUET_MAX_BATCH_SIZE);
    a GPU wants large ones."""
    return 256 if on_cuda(device) else 16


def usable_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def inference_workers(settings: Settings) -> int:
    """Forward passes at once per model: one per core on the CPU, where a single-threaded pass per
    core beat one pass over both cores of the 2-core bench machine (bench/RESULTS.md, serve); one on
    CUDA, where one large batch keeps the device busy."""
    if settings.inference_workers:
        return settings.inference_workers
    return 1 if on_cuda(settings.device) else usable_cores()


class TorchThreads:
    """torch's thread count, split between the worker threads while the service runs."""

    def __init__(self, device: str, workers: int) -> None:
        self.device = device
        self.workers = workers
        self._before: int | None = None

    def split(self) -> None:
        """On the CPU, split the cores between the worker threads (torch's thread count is one
        per process; by default it would give every concurrent forward pass all the cores)."""
        import torch

        if not on_cuda(self.device):
            threads = max(1, usable_cores() // self.workers)
            self._before = torch.get_num_threads()
            torch.set_num_threads(threads)
            logger.info(
                "CPU inference: %d forward passes at once per model, %d torch threads each", self.workers, threads
            )

    def restore(self) -> None:
        """Undo `split` (the process outlives the service in tests and embedders)."""
        import torch

        if self._before is not None:
            torch.set_num_threads(self._before)
            self._before = None

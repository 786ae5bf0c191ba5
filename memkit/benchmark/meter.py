"""Measuring a block of code: its peak memory, and the median of its running time.

* :class:`PeakMemory` (a context manager): how far the process's memory rose above its level at the
  start of the block. On CPU a background thread samples the resident set size from
  ``/proc/self/statm`` about every millisecond (no psutil); on CUDA it reads
  ``torch.cuda.max_memory_allocated``.
* :func:`time_interleaved`: warm-up runs, then ``repeats`` rounds that each run every function once,
  in turn, so that a slow spell of the machine hits every function alike; the median per function.
* :func:`rss_bytes` and :func:`release_memory` (``gc`` plus glibc's ``malloc_trim``), so that freed
  memory left in the allocator does not hide the next block's growth.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch

__all__ = ["PeakMemory", "Timing", "machine_info", "release_memory", "rss_bytes", "time_interleaved"]

_STATM = "/proc/self/statm"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """The process's resident set size now, in bytes (``/proc/self/statm``; elsewhere the lifetime peak)."""
    try:
        with open(_STATM, "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return _max_rss()


def _max_rss() -> int:
    """The lifetime peak resident set size (``getrusage``: kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the system (glibc ``malloc_trim``; a no-op elsewhere)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory growth of a block: ``with PeakMemory() as peak: ...``, then ``peak.bytes``.

    Args:
        device: where the block allocates. ``cuda`` devices are measured with
            ``torch.cuda.max_memory_allocated`` (peak minus the allocation at the start); anything else
            with the process's resident set size, sampled every ``interval_s`` seconds by a daemon thread
            (peak minus the size at the start).
        interval_s: sampling period on CPU.

    After the block: ``bytes`` (``>= 0``), ``start_bytes``, ``peak_bytes``, ``samples`` and ``method``
    (``"cuda_max_memory_allocated"``, ``"rss_sampled"`` or, without ``/proc``, ``"ru_maxrss"``: the
    lifetime peak, which only shows growth beyond every earlier peak of the process).
    """

    def __init__(self, device: torch.device | str | None = None, interval_s: float = 0.001) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self.samples = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None

    @property
    def bytes(self) -> int:
        """Peak minus start, never negative."""
        return max(self.peak_bytes - self.start_bytes, 0)

    def _sample(self) -> int:
        assert self._fd is not None
        return int(os.pread(self._fd, 128, 0).split()[1]) * _PAGE

    def _watch(self) -> None:
        while not self._stop.is_set():
            value = self._sample()
            self.samples += 1
            if value > self.peak_bytes:
                self.peak_bytes = value
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            self.method = "cuda_max_memory_allocated"
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = self.peak_bytes = int(torch.cuda.memory_allocated(self.device))
            return self
        try:
            self._fd = os.open(_STATM, os.O_RDONLY)
        except OSError:
            self.method = "ru_maxrss"
            self.start_bytes = self.peak_bytes = _max_rss()
            return self
        self.method = "rss_sampled"
        self.start_bytes = self.peak_bytes = self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="memkit-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        if self.method == "ru_maxrss":
            self.peak_bytes = _max_rss()
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._sample())
        self.samples += 1
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class Timing:
    """Durations of the timed runs of one function, in seconds (warm-up runs excluded)."""

    samples_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def min_s(self) -> float:
        return min(self.samples_s)

    def as_dict(self) -> dict[str, float | list[float]]:
        return {"median_s": self.median_s, "min_s": self.min_s, "samples_s": list(self.samples_s)}


def time_interleaved(
    functions: Mapping[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Time each function ``repeats`` times with :func:`time.perf_counter`, after ``warmup`` untimed rounds.

    The functions run in turn within every round (a, b, a, b, ...). A function that returns a
    ``float`` has timed its own region (e.g. the decoding steps of a ``generate`` call, without the
    prefill): that float is its sample; whatever else it returns, the sample is the wall time of the
    call. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock reading.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for round_ in range(warmup + repeats):
        for name, fn in functions.items():
            if sync is not None:
                sync()
            start = time.perf_counter()
            own = fn()
            if sync is not None:
                sync()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                samples[name].append(own if isinstance(own, float) else elapsed)
    return {name: Timing(tuple(values)) for name, values in samples.items()}


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """What a measurement ran on: platform, CPUs, torch threads, load average, versions, accelerator."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device) if device is not None else "cpu",
    }
    with contextlib.suppress(OSError, AttributeError):
        info["load_average_1_5_15_min"] = list(os.getloadavg())
    if device is not None and torch.device(device).type == "cuda":
        info["accelerator"] = torch.cuda.get_device_name(torch.device(device))
    return info

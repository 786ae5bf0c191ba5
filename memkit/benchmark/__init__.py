"""Benchmarks behind ``memkit bench``: memkit beside the plain model, and the long-term store's cost.

* :func:`run_speed` (``memkit bench speed``): inject and decode tokens per second, peak memory and
  retrieval latency per layer, each as a ratio against the plain base model in the same process.
* :func:`run_store_cost` (``memkit bench store``): add time, bytes and retrieval latency per entry of
  one layer's long-term store from 10k to 1M entries, and the growth exponent of the latency.
* :class:`PeakMemory` and :func:`time_interleaved`: the meters they use.
"""

from memkit.benchmark.meter import PeakMemory, Timing, time_interleaved
from memkit.benchmark.plot import plot_speed, plot_store
from memkit.benchmark.speed import AIM_DECODE, AIM_INJECT, run_speed
from memkit.benchmark.store_cost import DEFAULT_SIZES, QUICK_SIZES, growth_exponent, run_store_cost

__all__ = [
    "AIM_DECODE",
    "AIM_INJECT",
    "DEFAULT_SIZES",
    "QUICK_SIZES",
    "PeakMemory",
    "Timing",
    "growth_exponent",
    "plot_speed",
    "plot_store",
    "run_speed",
    "run_store_cost",
    "time_interleaved",
]

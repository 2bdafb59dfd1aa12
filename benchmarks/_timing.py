"""CUDA timing the GPU benchmarks share (woq_cuda_bench.py, gpu_checks/bench_tune_cuda.py): the median of CUDA-event
timed runs, and a pass of calls captured in a CUDA graph (its replay times the kernels without launch overhead)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch


def cuda_median_ms(fn: Callable[[], object], runs: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() between two CUDA events, over `runs` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def capture_graph(calls: Sequence[Callable[[], object]]) -> torch.cuda.CUDAGraph:
    """The calls, each once, captured in a CUDA graph; run once on a side stream first, as capture requires (lazy
    initialisation and workspace allocation must not happen inside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    return graph

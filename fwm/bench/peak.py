"""The host's float32 matmul peak, measured in the same run as the benchmarks (MFU's denominator)."""
from __future__ import annotations

import math
import time

import numpy as np

from fwm.train.metrics import jax_matmul_flops_per_s


def numpy_matmul_flops_per_s(n: int, repeats: int = 3) -> float:
    """Best float32 FLOP/s of an n x n numpy product (its BLAS), over `repeats` runs after a warm-up."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


def matmul_peaks(sizes: tuple[int, ...], repeats: int = 3) -> dict:
    """{"jax": {n: FLOP/s}, "numpy": {n: FLOP/s}, "best": the highest of them}."""
    out = {"jax": {str(n): jax_matmul_flops_per_s(n, repeats) for n in sizes},
           "numpy": {str(n): numpy_matmul_flops_per_s(n, repeats) for n in sizes}}
    out["best"] = max(max(v.values()) for v in out.values())
    return out

"""Training metrics out: metrics.jsonl (exact, resumable), TensorBoard events, console progress with MFU.

- `metrics.jsonl` in the stage's workdir: one JSON object per logged step ({"step": t, "loss": ...}),
  holding only values that a rerun reproduces (no wall-clock times), so a run that was killed and
  resumed writes the same file as an uninterrupted one. `truncate_jsonl` drops the lines after the
  restored step before a resumed run appends (atomic rewrite).
- TensorBoard events through tensorboardX (flax.metrics.tensorboard would need TensorFlow):
  the same scalars, throughput, and the config as text.
- `Throughput`: steps/s, trained tokens/s (tokens with loss weight > 0: what the run learns from;
  padding, prompts and masked observations excluded), ETA and MFU = achieved model FLOP/s
  (transformer's train_flops_per_token x processed tokens/s, i.e. batch x seq_len per step, because
  padding costs the same compute) / peak FLOP/s of the devices (`peak_flops_per_device`: a table for
  accelerators, a float32 matmul measured once per process on CPU).
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Mapping

from fwm.files import read_jsonl, write_jsonl


# Dense bf16 peak FLOP/s per JAX device, matched by substring of device.device_kind (first match wins).
# TPU v2/v3 expose one device per core (half a chip); v4 and later one per chip.
PEAK_FLOPS_PER_DEVICE: tuple[tuple[str, float], ...] = (
    ("TPU v2", 22.5e12), ("TPU v3", 61.5e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("B200", 2250e12), ("A100", 312e12),
    ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("V100", 125e12),
)
# CPUs have no meaningful table entry, and a nominal per-core figure overstated MFU about twofold on a
# 2-core EPYC: the peak is measured instead, as the best float32 matmul rate jax reaches on this host.
CPU_PEAK_MATMUL_SIZE = 2048  # ~17 GFLOP per product: long enough to time, ~0.3 s for the whole measure


@functools.lru_cache(maxsize=None)
def jax_matmul_flops_per_s(n: int = CPU_PEAK_MATMUL_SIZE, repeats: int = 3) -> float:
    """Best float32 FLOP/s of a jitted n x n @ n x n product on the default device (2 n^3 FLOPs each),
    over `repeats` timed runs after a warm-up. Memoised: one measure per process."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    product = jax.jit(jnp.matmul)
    product(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


def peak_flops_per_device(device_kind: str, platform: str, num_local_devices: int,
                          override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, a note on where it came from)."""
    if override > 0:
        return override, "configured peak (train.peak_flops_per_device)"
    if platform == "cpu":
        # Simulated CPU devices share the host's cores: each gets its share of the host's measured rate.
        measured = jax_matmul_flops_per_s()
        return (measured / max(num_local_devices, 1),
                f"vs this host's measured float32 matmul peak of {measured / 1e9:.0f} GFLOP/s (jax, n="
                f"{CPU_PEAK_MATMUL_SIZE}; set train.peak_flops_per_device to fix it)")
    for needle, flops in PEAK_FLOPS_PER_DEVICE:
        if needle.lower() in device_kind.lower():
            return flops, f"vs {device_kind} bf16 dense peak {flops / 1e12:.0f} TFLOP/s"
    return 0.0, f"no peak FLOP/s known for {device_kind!r}; set train.peak_flops_per_device"


def truncate_jsonl(path: str, last_step: int) -> int:
    """Keeps the lines of `path` with step <= last_step (and drops a torn last line); atomic rewrite.

    Returns the number of lines kept. A missing file is left missing.
    """
    if not os.path.exists(path):
        return 0
    kept = []
    # A line torn by a kill ends the trustworthy part: it and anything after it are dropped.
    for _, record in read_jsonl(path, stop_at_bad_line=True):
        if record.get("step", math.inf) > last_step:
            break
        kept.append(record)
    return write_jsonl(path, kept)


class MetricsWriter:
    """Appends records to metrics.jsonl (flushed per line) and scalars to TensorBoard; process 0 only."""

    def __init__(self, workdir: str, enabled: bool = True, purge_step: int | None = None):
        """purge_step: on resume, the first step to be rewritten; TensorBoard hides older events from
        that step on (the ones a killed run wrote after its last checkpoint)."""
        self.enabled = enabled
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self._file = None
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # lazy: only the writing process pays for it

            self._file = open(self.jsonl_path, "a")
            self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge_step)

    def write_config(self, text: str, step: int) -> None:
        if self._tb is not None:
            # Markdown code block: TensorBoard's text plugin renders it verbatim.
            self._tb.add_text("config", "```\n" + text + "\n```", step)

    def write(self, step: int, record: Mapping[str, float], extra_scalars: Mapping[str, float] | None = None) -> None:
        """One jsonl line {"step": step, **record}; TensorBoard gets record and extra_scalars."""
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": int(step), **{k: float(v) for k, v in record.items()}}) + "\n")
        self._file.flush()
        for key, value in {**record, **(extra_scalars or {})}.items():
            self._tb.add_scalar(key if "/" in key else f"train/{key}", float(value), step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Throughput:
    """Steps/s, trained tokens/s, ETA and MFU over the window since the previous report.

    The clock starts at the first report, so compilation never counts as training time. Trained tokens
    (loss weight > 0) are added per step with `add_trained_tokens`; MFU uses every processed position
    (tokens_per_step = batch x seq_len), which is what the device computes.
    """

    def __init__(self, total_steps: int, tokens_per_step: int, flops_per_token: float, peak_flops: float,
                 peak_note: str):
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.flops_per_token, self.peak_flops, self.peak_note = flops_per_token, peak_flops, peak_note
        self._last: tuple[int, float] | None = None
        self._timed_steps, self._timed_seconds, self._timed_trained = 0, 0.0, 0.0
        self._window_trained = 0.0

    def add_trained_tokens(self, count: float) -> None:
        """Counts one step's trained tokens (the step's `tokens` metric) into the current window."""
        self._window_trained += count

    def restart(self, step: int) -> None:
        """Starts a new window at `step` (after an eval or a checkpoint, which are not training time)."""
        self._last = (step, time.perf_counter())
        self._window_trained = 0.0

    def report(self, step: int, now: float | None = None) -> dict[str, float]:
        """Throughput since the previous call ({} on the first call)."""
        now = time.perf_counter() if now is None else now
        last, self._last = self._last, (step, now)
        trained, self._window_trained = self._window_trained, 0.0
        if last is None or step <= last[0] or now <= last[1]:
            return {}
        self._timed_steps += step - last[0]
        self._timed_seconds += now - last[1]
        self._timed_trained += trained
        return self._rates(step, (step - last[0]) / (now - last[1]), trained / (now - last[1]))

    def average(self, step: int) -> dict[str, float]:
        """Throughput over every window reported so far ({} if none)."""
        if not self._timed_steps:
            return {}
        return self._rates(step, self._timed_steps / self._timed_seconds, self._timed_trained / self._timed_seconds)

    def _rates(self, step: int, steps_per_s: float, trained_per_s: float) -> dict[str, float]:
        processed_per_s = steps_per_s * self.tokens_per_step
        out = {"perf/steps_per_s": steps_per_s, "perf/trained_tokens_per_s": trained_per_s,
               "perf/processed_tokens_per_s": processed_per_s, "perf/eta_s": (self.total_steps - step) / steps_per_s}
        if self.peak_flops > 0:
            out["perf/mfu"] = processed_per_s * self.flops_per_token / self.peak_flops
        return out

    def line(self, step: int, record: Mapping[str, float], perf: Mapping[str, float]) -> str:
        """Console progress line."""
        width = len(str(self.total_steps))
        parts = [f"step {step:>{width}}/{self.total_steps}"]
        parts += [f"{k} {v:.4g}" for k, v in record.items()]
        if perf:
            parts.append(f"{perf['perf/steps_per_s']:.2f} steps/s, {perf['perf/trained_tokens_per_s']:,.0f} trained "
                         f"tok/s (loss weight > 0), ETA {_format_duration(perf['perf/eta_s'])}")
            if "perf/mfu" in perf:
                parts.append(f"MFU {100 * perf['perf/mfu']:.2f}% of {perf['perf/processed_tokens_per_s']:,.0f} "
                             f"processed tok/s ({self.peak_note})")
        return " | ".join(parts)

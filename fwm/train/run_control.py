"""Run control shared by the supervised loop (fwm/train/loop.py) and the FC-RL loop (fwm/rl/loop.py).

- `StopRequest`: SIGTERM / SIGINT become a flag the loop polls after each step (or iteration); the
  loop then saves a checkpoint and returns normally. A second signal restores the default handlers
  and aborts at once.
- `warn_config_changes`: a resumed run logs every config key that differs from its checkpoint's.
- `check_finite`: the metrics of a step, fetched once; a NaN/Inf loss or gradient norm raises
  `NonFiniteLossError` naming the step, the values and the last good checkpoint. Loops call it before
  they save or write metrics, so a checkpoint never holds a diverged state.
"""
from __future__ import annotations

import math
import signal
import threading
from typing import Any, Mapping

import jax
from absl import logging


class NonFiniteLossError(FloatingPointError):
    """Training diverged; the message names the step, the values and the last good checkpoint."""


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop polls; a second signal restores the default and aborts."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, unit: str = "step"):
        self.name: str | None = None
        self.unit = unit  # what the loop finishes before it saves ("step", "iteration"), for the log line
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            logging.warning("not in the main thread: SIGTERM/SIGINT will not trigger a clean save")
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.name is not None:
            self.__exit__()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without saving")
        self.name = signal.Signals(signum).name
        logging.warning("%s received: finishing the current %s, then saving a checkpoint", self.name, self.unit)

    def requested(self, step: int, sync: bool) -> bool:
        """Whether to stop after `step`; with several processes all agree (checked at sync steps only)."""
        if jax.process_count() == 1:
            return self.name is not None
        if not sync:
            return False
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(int(self.name is not None)).max())

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def check_finite(step: int, metrics: Mapping[str, Any], root: str, manager: Any,
                 keys: tuple[str, ...] = ("loss", "grad_norm")) -> dict[str, float]:
    """`metrics` fetched to floats (jax.device_get); raises NonFiniteLossError if any of `keys` present
    is NaN/Inf, naming the manager's newest checkpoint as the last good one."""
    values = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
    bad = [k for k in keys if k in values and not math.isfinite(values[k])]
    if bad:
        last = manager.latest_step()
        where = f"step {last} in {root}" if last is not None else f"none in {root}"
        shown = " and ".join(f"{k} {values[k]}" if i else f"{k} is {values[k]}" for i, k in enumerate(keys)
                             if k in values)
        raise NonFiniteLossError(
            f"step {step}: {shown}; stopped without saving (last good checkpoint: {where}). "
            f"Lower optim.lr, raise optim.warmup_steps or check the data."
        )
    return values


def warn_config_changes(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> None:
    """Logs a warning per config key (dotted) whose value differs between a checkpoint's config and this
    run's (train.workdir excepted)."""
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            warn_config_changes(a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" != "train.workdir":
            logging.warning("config %s%s changed since the checkpoint: %r -> %r", prefix, key, a, b)

"""Counts XLA compilations (jax's backend-compile events), to show that nothing compiles after warm-up."""
from __future__ import annotations

import jax

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_count = 0


def _listener(event: str, duration_secs: float, **kwargs) -> None:
    del duration_secs, kwargs
    global _count
    if event == _BACKEND_COMPILE_EVENT:
        _count += 1


jax.monitoring.register_event_duration_secs_listener(_listener)


def compilations() -> int:
    """XLA compilations in this process so far (since this module was imported); a difference of two
    readings around timed work is its number of (re)compilations, any jitted program included."""
    return _count

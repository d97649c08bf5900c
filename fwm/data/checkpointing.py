"""Orbax arguments that save/restore a Grain data iterator inside a `CheckpointManager` Composite.

Usage in a training loop (the iterator is one item of the Composite, next to the train state):

    manager.save(step, args=ocp.args.Composite(state=..., data=checkpoint_args_save(iterator)))
    manager.restore(step, args=ocp.args.Composite(state=..., data=checkpoint_args_restore(iterator)))

Restoring sets the state of the (fresh) iterator in place; its next batch is the one that followed
the saved step. Grain writes one JSON state file per process, named by jax.process_index().
"""
from __future__ import annotations

import grain
import grain.checkpoint  # noqa: F401  (registers CheckpointSave/Restore with orbax)


def checkpoint_args_save(iterator: grain.DatasetIterator) -> "grain.checkpoint.CheckpointSave":
    """Composite item that saves `iterator`'s position."""
    return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_args_restore(iterator: grain.DatasetIterator) -> "grain.checkpoint.CheckpointRestore":
    """Composite item that restores a saved position into `iterator` (a fresh iterator of the same pipeline)."""
    return grain.checkpoint.CheckpointRestore(iterator)

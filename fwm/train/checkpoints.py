"""Training checkpoints: an orbax CheckpointManager over Composite(state, data, meta) in WORKDIR/checkpoints.

Each step directory holds three items (names shared with fwm/model/checkpoint.py, whose
`load_params` reads `state.params` of these directories for the next stage):
  state/  StandardSave(TrainState)         -- params, optimiser state, step; sharded arrays
  data/   the Grain iterator's position     -- resumes on exactly the next batch (one file per process;
                                               another process count skips ahead instead, see `restore`)
  meta/   JsonSave({model_config, config, tokenizer, tokenizer_sha256, stage, step, total_steps});
          `tokenizer` is the workdir's copy, so the next stage finds the ids these parameters use
The manager is Composite from its first save (an orbax manager that once saved one unnamed item
cannot later take Composite args). Saves are asynchronous: `save` returns once the arrays are
copied off the devices, so the next (donating) step may run while files are written; an
unfinished save leaves only a temporary directory that orbax ignores and cleans up.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from fwm.data.checkpointing import checkpoint_args_restore, checkpoint_args_save
from fwm.model.checkpoint import META_ITEM, STATE_ITEM
from fwm.train.state import TrainState

DATA_ITEM = "data"
CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_root(workdir: str) -> str:
    """Absolute directory of a workdir's step checkpoints (orbax wants absolute paths)."""
    return os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR))


def has_checkpoint(workdir: str) -> bool:
    """Whether the workdir holds a step directory (checked without creating anything; orbax's unfinished
    saves carry a suffix and do not count)."""
    root = checkpoint_root(workdir)
    return os.path.isdir(root) and any(name.isdigit() for name in os.listdir(root))


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """Manager keeping the newest `keep` step checkpoints of `workdir`."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(checkpoint_root(workdir), options=options,
                                 item_names=(STATE_ITEM, DATA_ITEM, META_ITEM))


def save(manager: ocp.CheckpointManager, step: int, state: TrainState, data_iterator: grain.DatasetIterator,
         meta: Mapping[str, Any]) -> None:
    """Starts saving step `step` (asynchronously unless the manager is synchronous)."""
    args = ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(state),
        DATA_ITEM: checkpoint_args_save(data_iterator),
        META_ITEM: ocp.args.JsonSave(dict(meta)),
    })
    manager.save(step, args=args, force=True)


def restore_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The meta JSON of step `step` (read first: it says which model the state holds)."""
    return manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]


def saved_data_positions(manager: ocp.CheckpointManager, step: int) -> list[str]:
    """The names of the data iterator position files of step `step`: Grain writes one per process,
    `process_{index}-of-{count}.json`, so they say how many processes wrote the checkpoint."""
    directory = epath.Path(manager.directory) / str(step) / DATA_ITEM
    return sorted(p.name for p in directory.glob("process_*-of-*.json")) if directory.exists() else []


def restore(manager: ocp.CheckpointManager, step: int, target: TrainState,
            data_iterator: grain.DatasetIterator, batches_done: int) -> TrainState:
    """State of step `step` onto the shardings of `target` (ShapeDtypeStructs with shardings);
    `data_iterator` (fresh, same pipeline) is moved in place to the saved position.

    Orbax reshards the state onto any mesh, so a checkpoint restores on another process count too. The
    data position cannot follow: each process's position is of its own shard (records p, p+P, ... of P
    processes), and another count makes other shards. Then `batches_done` batches (the steps, or RL
    iterations, the checkpoint had taken) are drawn from each process's new shard and dropped, so the run
    goes on at the same point of the epoch -- at the cost of reading them once more.
    """
    own_file = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    saved = saved_data_positions(manager, step)
    if own_file in saved:
        restored = manager.restore(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore(target),
            DATA_ITEM: checkpoint_args_restore(data_iterator),
        }))
        return restored[STATE_ITEM]
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)}))
    logging.warning("checkpoint %s/%d holds the data positions %s, not this run's %s (another process count): "
                    "skipping %d batches of this process's shard to reach the same point of the epoch",
                    manager.directory, step, saved or "(none)", own_file, batches_done)
    for _ in range(batches_done):
        next(data_iterator)
    return restored[STATE_ITEM]

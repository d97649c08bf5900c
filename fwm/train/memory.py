"""Memory per device of a training run: the state on the mesh, the compiled step's own numbers, and an
estimate from the config alone (for sizing a run before any accelerator exists: experiments/paper_*.py).

- `state_bytes`: params and optimiser state per device, from the shardings the state really has.
- `compiled_bytes`: XLA's memory analysis of the compiled step (arguments, outputs, temporaries); its
  `peak` is what the step needs on one device beyond nothing else being resident.
- `estimate`: the same breakdown from (model config, mesh shape, batch) by arithmetic -- the state's
  shards exactly (fwm.mesh's rules on abstract shapes), activations by a per-layer count (module
  `estimate`'s docstring); it is what the paper configs' docstrings write out by hand.
The supervised loop logs `step_line` of its compiled step at start-up; the RL step logs it for each new
batch shape it compiles.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np

from fwm.mesh import logical_to_mesh_spec
from fwm.model import transformer

GIB = float(1 << 30)


def _leaf_bytes(shape: tuple[int, ...], dtype: Any) -> int:
    return int(math.prod(shape)) * np.dtype(dtype).itemsize


def tree_bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a pytree of sharded arrays (or ShapeDtypeStructs with shardings)."""
    return sum(_leaf_bytes(leaf.sharding.shard_shape(leaf.shape), leaf.dtype) for leaf in jax.tree.leaves(tree))


def state_bytes(state: Any) -> dict[str, int]:
    """{params, optimizer} bytes per device of a TrainState (arrays or abstract with shardings)."""
    return {"params": tree_bytes_per_device(state.params), "optimizer": tree_bytes_per_device(state.opt_state)}


def compiled_bytes(compiled: Any) -> dict[str, int]:
    """XLA's memory analysis of a compiled step, per device: arguments, outputs, aliased (donated inputs
    reused as outputs), temporaries, and peak = arguments + outputs - aliased + temporaries."""
    stats = compiled.memory_analysis()
    out = {"arguments": int(stats.argument_size_in_bytes), "outputs": int(stats.output_size_in_bytes),
           "aliased": int(stats.alias_size_in_bytes), "temporaries": int(stats.temp_size_in_bytes)}
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def device_memory_bytes(device: Any) -> int | None:
    """The device's memory capacity (None where the backend does not say, e.g. CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def _sharded_bytes(shapes: Any, logical: Any, mesh_shape: Mapping[str, int]) -> int:
    """Per-device bytes of abstract arrays under logical specs on a mesh of `mesh_shape` (no devices needed)."""
    total = 0
    specs = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    for leaf, spec in zip(jax.tree.leaves(shapes), specs):
        mesh_spec = logical_to_mesh_spec(spec, leaf.shape, mesh_shape)
        shard = list(leaf.shape)
        for dim, axes in enumerate(tuple(mesh_spec)):
            for axis in (() if axes is None else (axes,) if isinstance(axes, str) else axes):
                shard[dim] //= mesh_shape[axis]
        total += _leaf_bytes(tuple(shard), leaf.dtype)
    return total


def estimate(model_cfg: transformer.ModelConfig, tx: Any, mesh_shape: Mapping[str, int], batch_size: int,
             seq_len: int, micro_batches: int = 1, loss_chunk_size: int = 0) -> dict[str, float]:
    """Estimated bytes per device of one training step (see the module doc), by component:

    params, optimizer   the state's shards, exactly (fwm.mesh rules on eval_shape'd shapes)
    gradients           float32 gradient sums, sharded like the params (x2 with micro-batches: the
                        accumulator and the micro-batch's own)
    layer_inputs        the residual stream saved per layer for the backward pass: layers x b x S x D x c
                        (b rows per device per micro-batch, c bytes of compute_dtype); with
                        remat_policy 'none' or 'dots' more is saved per layer (below)
    layer_work          one layer's forward working set, live while that layer is (re)computed:
                        q/k/v/o, gate/up/hidden (c bytes each) and the float32 attention scores and
                        probabilities b x H x S x S x 4 x 2 (heads and MLP split over `tensor`)
    gathered_weights    one layer's weights all-gathered over fsdp in compute dtype, forward + backward
    logits              float32 logits, their softmax and gradient: 3 x b x S x V x 4 (V split over
                        tensor), or b x chunk instead of b x S with train.loss_chunk_size
    total               the sum
    With remat 'none' every layer keeps its working set (layer_inputs grows to layers x layer_work);
    with 'dots' it keeps the matmul outputs (q/k/v/o, gate/up/down). An estimate: XLA fuses and
    reuses buffers, so the compiled step (compiled_bytes) is the measurement.
    """
    data, fsdp, tensor = (int(mesh_shape.get(a, 1)) for a in ("data", "fsdp", "tensor"))
    mesh = {"data": data, "fsdp": fsdp, "tensor": tensor}
    from fwm.train.state import state_logical_axes, state_shapes  # lazy: state imports optax

    shapes, logical = state_shapes(model_cfg, tx), state_logical_axes(model_cfg, tx)
    params = _sharded_bytes(shapes.params, logical.params, mesh)
    optimizer = _sharded_bytes(shapes.opt_state, logical.opt_state, mesh)
    param_count = sum(int(math.prod(s.shape)) for s in jax.tree.leaves(shapes.params))
    f32_params = params * 4 // max(np.dtype(model_cfg.param_dtype).itemsize, 1)
    gradients = f32_params * (2 if micro_batches > 1 else 1)
    c = np.dtype(model_cfg.compute_dtype).itemsize
    rows = batch_size / (data * fsdp) / micro_batches
    s, d, layers = seq_len, model_cfg.hidden_size, model_cfg.num_layers
    heads, kv, dh, mlp = model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.head_dim, model_cfg.mlp_dim
    tp = lambda n: n / tensor if n % tensor == 0 else n  # noqa: E731 -- fwm.mesh replicates what does not divide
    matmul_out = c * rows * s * (2 * d + tp((heads + 2 * kv) * dh) + tp(heads * dh) + 3 * tp(mlp))
    scores = rows * tp(heads) * s * s * 4 * 2
    layer_work = matmul_out + scores
    saved_per_layer = {"full": c * rows * s * d, "dots": c * rows * s * d + matmul_out,
                       "none": c * rows * s * d + layer_work}[model_cfg.remat_policy]
    per_layer_params = (param_count - model_cfg.vocab_size * d * (1 if model_cfg.tie_embeddings else 2)) / layers
    gathered = 2 * per_layer_params * c / tensor
    positions = min(loss_chunk_size, s) if loss_chunk_size > 0 else s
    logits = 3 * rows * positions * tp(model_cfg.vocab_size) * 4 + (c * rows * s * d if loss_chunk_size else 0)
    out = {"params": float(params), "optimizer": float(optimizer), "gradients": float(gradients),
           "layer_inputs": float(layers * saved_per_layer), "layer_work": float(layer_work),
           "gathered_weights": float(gathered), "logits": float(logits)}
    out["total"] = sum(out.values())
    return out


def format_line(parts: Mapping[str, float], mesh_shape: Mapping[str, int], capacity: int | None = None) -> str:
    """'memory per device on mesh data=.. fsdp=.. tensor=..: params 1.20 GiB, ...; peak X GiB of Y GiB'
    (the last entry of `parts` is the headline: the compiled peak or the estimated total)."""
    mesh = " ".join(f"{k}={v}" for k, v in mesh_shape.items())
    *details, (total_key, total) = parts.items()
    shown = ", ".join(f"{k} {v / GIB:.3g} GiB" for k, v in details)
    of = f" of {capacity / GIB:.1f} GiB" if capacity else ""
    return f"memory per device on mesh {mesh}: {shown}; {total_key} {total / GIB:.3g} GiB{of}"


def step_line(state: Any, compiled: Any, mesh: Any) -> str:
    """The start-up line of a compiled step: the state's params and optimiser bytes per device, the compiled
    step's arguments / outputs / temporaries and its peak, against the device's capacity where known."""
    parts = {**state_bytes(state), **compiled_bytes(compiled)}
    return format_line(parts, dict(mesh.shape), device_memory_bytes(jax.local_devices()[0]))

"""Device mesh (axes data, fsdp, tensor), the logical-axis rules, state/batch shardings, and multi-process start-up.

One table, `LOGICAL_AXIS_RULES`, maps every logical axis name used by the model and the data to
mesh axes. Everything that places an array goes through `logical_to_sharding`, which falls back
to replication on any dimension its mesh axes do not divide (so odd vocab sizes, batch 1 decode
or a 5-head model still run on any mesh instead of failing in `device_put`).

Multi-process (several hosts, or several processes on one machine): `initialize_distributed` joins the
run before any device is touched; the mesh then spans every process's devices (jax.devices() is global),
each process reads its own rows and `place_batch` assembles them into one global batch array.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Reasons, one per choice:
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # Batch rows split over data and fsdp: fsdp shards are also data-parallel replicas of the step.
    ("batch", ("data", "fsdp")),
    # Parameter 'embed' dims are split over fsdp: ZeRO-3 style, gathered per layer inside the scan.
    ("embed", "fsdp"),
    # Vocab split over tensor: the embedding/logit matmul is the largest one for small models.
    ("vocab", "tensor"),
    # Attention heads (flattened H*Dh / K*Dh) split over tensor: Megatron column/row parallel.
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    # MLP hidden dim split over tensor: gate/up column-parallel, down row-parallel.
    ("mlp", "tensor"),
    # Norm scales and the stacked-layer axis are tiny or scanned over: replicate.
    ("norm", None),
    ("layers", None),
    # Sequence length is not split (no sequence parallelism in this codebase).
    ("length", None),
    # Activations: hidden width replicated (fsdp all-gathers weights, not activations).
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(mesh_config: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a mesh with axes (data, fsdp, tensor) and Auto axis types.

    `mesh_config` maps axis name -> size; one size may be -1 to take the remaining devices.
    Missing axes default to data=-1, fsdp=1, tensor=1.
    """
    devices = list(devices if devices is not None else jax.devices())
    given = dict(mesh_config or {})
    # data fills the rest by default, unless the config already names the axis that does.
    cfg = {"data": 1 if -1 in given.values() else -1, "fsdp": 1, "tensor": 1}
    for key, value in given.items():
        if key not in cfg:
            raise ValueError(f"mesh config: unknown axis {key!r}; expected one of {MESH_AXES}")
        cfg[key] = int(value)
    sizes = [cfg[a] for a in MESH_AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh config {cfg}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh config {cfg}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(f"mesh config {cfg}: {len(devices)} devices are not divisible by {known}")
        sizes[fill[0]] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh config {cfg}: mesh of {math.prod(sizes)} devices but {len(devices)} are available"
        )
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices
    )


def _rules_dict(rules: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    return {name: axes for name, axes in rules}


def logical_to_mesh_spec(
    logical: PartitionSpec | Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh_shape: Mapping[str, int] | None = None,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """Maps logical axis names to a mesh PartitionSpec.

    With `shape` and `mesh_shape`, a dimension whose size its mesh axes do not divide is replicated.
    A mesh axis is used at most once per array (the first dimension claiming it wins).
    """
    table = _rules_dict(rules)
    used: set[str] = set()
    out = []
    for dim, name in enumerate(tuple(logical)):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        axes = table[name]
        axes_t = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes_t = tuple(a for a in axes_t if a not in used)
        if mesh_shape is not None:
            axes_t = tuple(a for a in axes_t if mesh_shape.get(a, 1) > 1)
            if shape is not None and axes_t:
                size = math.prod(mesh_shape[a] for a in axes_t)
                if shape[dim] % size:
                    axes_t = ()
        used.update(axes_t)
        out.append(None if not axes_t else (axes_t[0] if len(axes_t) == 1 else axes_t))
    return PartitionSpec(*out)


def logical_to_sharding(logical_tree: Any, mesh: Mesh, shape_tree: Any) -> Any:
    """Pytree of logical PartitionSpecs + matching shapes (arrays or ShapeDtypeStructs) -> NamedShardings."""
    mesh_shape = dict(mesh.shape)

    def one(logical: PartitionSpec, leaf: Any) -> NamedSharding:
        return NamedSharding(mesh, logical_to_mesh_spec(logical, leaf.shape, mesh_shape))

    return jax.tree.map(one, logical_tree, shape_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names inside jit; a no-op when no mesh is set.

    Uses the mesh from `jax.set_mesh`; dimensions not divisible by their axes stay unconstrained.
    """
    abstract = jax.sharding.get_abstract_mesh()
    if abstract.empty:
        return x
    spec = logical_to_mesh_spec(logical, x.shape, dict(abstract.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Sharding of a batch array: rows over (data, fsdp), other dims replicated."""
    logical = ("batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, logical_to_mesh_spec(logical, shape, dict(mesh.shape)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def place_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Places a per-process batch (this process's rows) as global arrays sharded over batch rows.

    Every process passes its own slice; the global batch has process_count times as many rows.
    """
    out = {}
    n_proc = jax.process_count()
    for key, value in local_batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * n_proc,) + value.shape[1:]
        sharding = batch_sharding(mesh, global_shape)
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def process_reduce(values: Any, reduce: Any = np.max) -> np.ndarray:
    """`reduce` (np.max, np.sum, ...) of `values` over processes, elementwise: what every process must agree
    on before a collective (shapes, call counts). One process: `values` as they are, without a collective.
    The exchange goes through jax, so float64 arrives as float32 (x64 off): keep exact counts in ints."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(reduce(multihost_utils.process_allgather(values), axis=0))


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a row-sharded global array, on the host: the inverse of `place_batch`
    (jax.device_get refuses an array other processes hold parts of). One process: the whole array."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    shards: dict[int, Any] = {}
    for shard in x.addressable_shards:  # replicas over the other mesh axes repeat a row block: keep one
        shards.setdefault(shard.index[0].start or 0, shard.data)
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


# Environment variables of a multi-process run (launch/tpu_vm.sh exports FWM_DISTRIBUTED=1 on every worker;
# on TPU VMs, SLURM and GKE jax finds the coordinator, process count and index itself).
DISTRIBUTED_ENV = "FWM_DISTRIBUTED"
COORDINATOR_ENV = "FWM_COORDINATOR"          # host:port of process 0
NUM_PROCESSES_ENV = "FWM_NUM_PROCESSES"
PROCESS_ID_ENV = "FWM_PROCESS_ID"


def distributed_args(enabled: bool, env: Mapping[str, str]) -> dict[str, Any] | None:
    """The keyword arguments of jax.distributed.initialize for this process, or None for a single-process run.

    Multi-process when `enabled` (config key train.distributed) or env FWM_DISTRIBUTED=1. FWM_COORDINATOR,
    FWM_NUM_PROCESSES and FWM_PROCESS_ID set what they name; unset ones are left to jax's cluster
    auto-detection (TPU VM metadata, SLURM, ...), which fails with its own message where there is none.
    """
    flag = env.get(DISTRIBUTED_ENV, "").strip().lower()
    if flag not in ("", "0", "1", "true", "false"):
        raise ValueError(f"environment variable {DISTRIBUTED_ENV}={env[DISTRIBUTED_ENV]!r}; expected 1 or 0")
    if not (enabled or flag in ("1", "true")):
        return None
    args: dict[str, Any] = {"coordinator_address": env.get(COORDINATOR_ENV) or None}
    for key, name in (("num_processes", NUM_PROCESSES_ENV), ("process_id", PROCESS_ID_ENV)):
        value = env.get(name, "").strip()
        if value and not value.isdigit():
            raise ValueError(f"environment variable {name}={value!r}; expected a non-negative integer")
        args[key] = int(value) if value else None
    return args


def initialize_distributed(enabled: bool, env: Mapping[str, str] | None = None) -> bool:
    """Joins the multi-process run (jax.distributed.initialize) when `distributed_args` says so; call it
    before anything touches a jax device. Idempotent. Returns whether this is a multi-process run.

    Every process but 0 then logs warnings and errors only: process 0 speaks for the run (it alone
    writes metrics.jsonl, TensorBoard and reports; see the loops).
    """
    args = distributed_args(enabled, os.environ if env is None else env)
    if args is None:
        return False
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(**args)
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)
    logging.info("multi-process run: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True

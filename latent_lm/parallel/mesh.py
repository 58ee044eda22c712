"""Device mesh and logical-axis sharding (docs/design.md §7).

The mesh has axes (data, fsdp, tensor); `config.mesh.shape` may hold one -1 that is filled from the device count.
Multi-slice TPU and multi-node GPU jobs add `config.mesh.dcn_shape` (default (1, 1, 1)): the slow data-centre
network between slices (TPU) or processes (GPU nodes) carries those factors, `shape` is the fast ICI/NVLink mesh
inside each one, and the global mesh is their elementwise product (`mesh_utils.create_hybrid_device_mesh`).
Logical axis names on parameters and activations are mapped to mesh axes by `config.mesh.rules` only.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from latent_lm.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The default mapping: batch over (data, fsdp), parameters' model dim over fsdp, MLP/heads/vocab over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("embed_out", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("latent", None),
    ("freq", None),
    ("patch", None),
    ("pos", None),
    ("layers", None),  # the scanned layer axis: stacked, never split (pipeline parallelism would use it)
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills a single -1; raises one clear error if the shape cannot cover `num_devices`."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ConfigError(f"mesh.shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh.shape {shape}: use positive sizes and at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(f"mesh.shape {shape} does not divide the {num_devices} available devices")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ConfigError(f"mesh.shape {shape} has {math.prod(shape)} devices but {num_devices} are available")
    return shape


def make_mesh(mesh_config=None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (so GSPMD propagates logical constraints)."""
    devices = list(devices if devices is not None else jax.devices())
    dcn = tuple(int(s) for s in (mesh_config.get("dcn_shape") or (1, 1, 1))) if mesh_config is not None else (1,) * 3
    if len(dcn) != len(MESH_AXES) or any(s < 1 for s in dcn):
        raise ConfigError(f"mesh.dcn_shape must be {len(MESH_AXES)} positive sizes {MESH_AXES}, got {dcn}")
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    ici_devices = len(devices) // math.prod(dcn)
    if len(devices) % math.prod(dcn):
        raise ConfigError(f"mesh.dcn_shape {dcn} does not divide the {len(devices)} available devices")
    shape = resolve_mesh_shape(mesh_config.shape if mesh_config is not None else (-1, 1, 1), ici_devices)
    if math.prod(dcn) == 1:
        if any(getattr(d, "core_on_chip", 0) for d in devices):
            # One device per TensorCore (v4 compile-only topologies): jax.make_mesh's physical TPU layout takes one
            # device per chip, so the devices go in their given order, a chip's two cores next to each other.
            return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    # TPU multislice: one granule per slice. GPU nodes and CPU processes (whose devices all report slice 0, or
    # nothing): one granule per process.
    slices = {getattr(d, "slice_index", None) for d in devices}
    by_process = len(slices) == 1
    granules = len({d.process_index for d in devices}) if by_process else len(slices)
    if granules != math.prod(dcn):
        raise ConfigError(f"mesh.dcn_shape {dcn} needs {math.prod(dcn)} {'processes' if by_process else 'slices'}, "
                          f"found {granules}")
    array = mesh_utils.create_hybrid_device_mesh(shape, dcn, devices, process_is_granule=by_process)
    return Mesh(array, MESH_AXES, axis_types=axis_types)


def logical_rules(mesh_config=None) -> tuple[tuple[str, Any], ...]:
    rules = mesh_config.get("rules") if mesh_config is not None else None
    if not rules:
        return DEFAULT_RULES
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def logical_shardings(abstract_tree, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of (boxed) abstract params; unboxed leaves are replicated.

    A dimension whose size the mapped mesh axes do not divide (e.g. a 1001-row class table on tensor=2) is
    replicated along that dimension instead of failing; everything else follows the rules.
    """
    specs = nn.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    return jax.tree.map(lambda x, s: _divisible(x.shape, s), nn.unbox(abstract_tree), shardings)


def _divisible(shape: tuple[int, ...], sharding: NamedSharding) -> NamedSharding:
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for i, axes in enumerate(spec):
        if axes is None:
            continue
        ways = math.prod(sharding.mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
        if shape[i] % ways:
            spec[i] = None
    return NamedSharding(sharding.mesh, P(*spec))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles the global batch from this process's rows (one process: the whole batch)."""

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(put, batch)


def pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
    """`x` with its leading axis padded to a multiple of `multiple` by repeating its last row."""
    extra = -len(x) % multiple
    return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) if extra else x


def global_rows(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array that every process holds whole (e.g. the sample stage's labels) as a global array split over
    (data, fsdp); its leading axis must divide by the data-parallel size (`pad_rows`)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim), lambda index: x[index])


def host_arrays(tree):
    """Every array of `tree` whole, as numpy, on every process (gathered where it spans several processes)."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def largest_replicated(tree, shardings) -> tuple[str, int]:
    """(path, element count) of the largest array that every device holds whole (no dimension split)."""
    best = ("", 0)
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shardings)):
        if s.shard_shape(x.shape) == tuple(x.shape) and math.prod(x.shape) > best[1]:
            best = (jax.tree_util.keystr(path), math.prod(x.shape))
    return best

"""Thin orbax wrapper: items `state` (train state), `data` (grain iterator state) and `meta` (JSON) (DESIGN §3).

Saves are asynchronous; orbax writes each step to a temporary directory and renames it when complete, so a
partially written step is never listed as a checkpoint. Restores target the abstract state built for the
*current* mesh, so a run can resume on a different device count.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 3, save_every: int = 1000, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.save_every = save_every
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                                 create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, *, data_iter=None, meta: dict | None = None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state, *, step: int | None = None, data_iter=None) -> tuple[Any, dict] | None:
        """Restores (state, meta) at `step` (default: latest), placing arrays on `abstract_state`'s shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        logging.info("restored checkpoint step %d from %s", step, self.directory)
        return restored["state"], restored["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying target shardings (for restoring onto the current mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

"""Thin orbax wrapper: items `state` (train state), `data` (grain iterator state) and `meta` (JSON) (docs/design.md §7).

Saves are asynchronous; orbax writes each step to a temporary directory and renames it when complete, so a
partially written step (e.g. after `kill -9` during a save) is never listed as a checkpoint, and the leftover
temporary directory is removed when the next manager opens. Restores target the abstract state built for the
*current* mesh, so a run can resume on a different mesh or device count. A latest checkpoint that cannot be read
(corrupted, truncated) is moved aside with a warning and the previous one is used; a checkpoint that does not fit a
changed config is an error and is never moved.

The directory may be a URL (gs://...): orbax writes it through TensorStore and epath; there a step is complete once
its `commit_success.txt` exists instead of after a rename, and moving a damaged step aside copies its objects to the
new name and deletes the old ones (`storage.replace`).
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from latent_lm import storage
from latent_lm.errors import UserError


class NoUsableCheckpointError(UserError, RuntimeError):
    pass


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 3, save_every: int = 1000, async_save: bool = True):
        self.directory = storage.absolute(directory)
        storage.require_backend(self.directory)
        if self.directory.startswith("gs://"):
            try:  # orbax asks the bucket whether it has a hierarchical namespace before listing steps
                importlib.import_module("google.cloud.storage")
            except ImportError:
                raise storage.MissingBackendError(
                    f"checkpoints in {self.directory} need google-cloud-storage (orbax lists steps in a bucket "
                    f"with it): pip install 'latent-lm[gcs]'") from None
        self.save_every = save_every
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                                 create=True, cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, *, data_iter=None, meta: dict | None = None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state, *, step: int | None = None, data_iter=None) -> tuple[Any, dict] | None:
        """Restores (state, meta) at `step`, placing arrays on `abstract_state`'s shardings.

        Without `step`: the latest checkpoint that restores. Newer ones that failed are quarantined (renamed to
        `corrupt.<step>.<time>`, with a warning) only once an older one has restored into the same abstract state,
        which shows the failure was the checkpoint's and not a changed config. If none restores, nothing is moved
        and one error says so. Returns None when there is no checkpoint at all.
        """
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        failed: list[tuple[int, Exception]] = []
        for s in steps:
            items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
            if data_iter is not None:
                if storage.isdir(storage.join(self.directory, str(s), "data")):
                    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
                else:
                    logging.warning("checkpoint step %d has no data-iterator state: the data starts afresh", s)
            try:
                restored = self.manager.restore(s, args=ocp.args.Composite(**items))
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                if step is not None:
                    raise
                failed.append((s, e))
                continue
            for bad, error in failed:
                self._quarantine(bad, error)
            logging.info("restored checkpoint step %d from %s", s, self.directory)
            return restored["state"], restored["meta"]
        if failed:
            s, e = failed[0]
            raise NoUsableCheckpointError(
                f"none of the {len(failed)} checkpoints under {self.directory} restores into this run's state "
                f"(latest, step {s}: {type(e).__name__}: {str(e).splitlines()[0][:300]}). If the model or "
                f"optimizer config changed, use a new --workdir; if the files are damaged, move them aside")
        return None

    def _quarantine(self, step: int, error: Exception) -> None:
        message = (f"WARNING: checkpoint step {step} in {self.directory} is unreadable "
                   f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); moved aside as corrupt.{step}.*, "
                   f"falling back to the previous one")
        logging.warning(message)
        if jax.process_index() == 0:
            print(message, flush=True)
            storage.replace(storage.join(self.directory, str(step)),
                            storage.join(self.directory, f"corrupt.{step}.{int(time.time())}"))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """JAX's preemption sync point (multi-host: every process agrees on the same step)."""
        return jax.process_count() > 1 and self.manager.reached_preemption(step)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying target shardings (for restoring onto the current mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

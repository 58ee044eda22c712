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

Another process count (docs/scaling_out.md §4.1): `data` holds one `process_<i>-of-<n>.json` per process. A run with
a different number of processes finds no file of its own; when the pipeline has the global order
(data_pipelines/sharding.py) and the checkpoint's meta says the run that wrote it had it too, every process's
position is the same, so any saved file continues the same global batches. Otherwise (per-process streams, such as
the packed multimodal rows) the restore stops with one `ProcessCountChangedError` line before anything is restored or
written.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
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


class ProcessCountChangedError(UserError, RuntimeError):
    """A checkpoint whose data position is per process, resumed by another number of processes."""


GLOBAL_ORDER = "global"  # meta["data_order"] of a run whose pipeline had the global order; else "per_process"
_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


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

    def restore(self, abstract_state, *, step: int | None = None, data_iter=None,
                global_order: bool = False) -> tuple[Any, dict] | None:
        """Restores (state, meta) at `step`, placing arrays on `abstract_state`'s shardings, and `data_iter`'s
        position. `global_order`: the pipeline's global batches do not depend on the process count
        (data_pipelines/sharding.py), so a checkpoint of another process count may set its position.

        Without `step`: the latest checkpoint that restores. Newer ones that failed are quarantined (renamed to
        `corrupt.<step>.<time>`, with a warning) only once an older one has restored into the same abstract state,
        which shows the failure was the checkpoint's and not a changed config. If none restores, nothing is moved
        and one error says so. Returns None when there is no checkpoint at all. A data position that this process
        count cannot continue raises `ProcessCountChangedError` before anything is restored.
        """
        steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
        failed: list[tuple[int, Exception]] = []
        for s in steps:
            items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
            foreign = None  # the data position written by another process count, to set after the restore
            if data_iter is not None:
                saved = self._data_files(s)
                if not saved:
                    logging.warning("checkpoint step %d has no data-iterator state: the data starts afresh", s)
                elif _data_file_name() in saved:
                    items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
                else:
                    try:
                        meta = self.manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                    except Exception as e:  # a damaged meta: the step is unreadable, as below
                        if step is not None:
                            raise
                        failed.append((s, e))
                        continue
                    foreign = self._foreign_data_state(s, saved, meta, global_order)
            try:
                restored = self.manager.restore(s, args=ocp.args.Composite(**items))
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                if step is not None:
                    raise
                failed.append((s, e))
                continue
            for bad, error in failed:
                self._quarantine(bad, error)
            if foreign is not None:
                _set_data_state(data_iter, foreign)
            elif "data" in items and global_order:
                _warn_if_order_changed(s, restored["meta"])
            logging.info("restored checkpoint step %d from %s", s, self.directory)
            return restored["state"], restored["meta"]
        if failed:
            s, e = failed[0]
            raise NoUsableCheckpointError(
                f"none of the {len(failed)} checkpoints under {self.directory} restores into this run's state "
                f"(latest, step {s}: {type(e).__name__}: {str(e).splitlines()[0][:300]}). If the model or "
                f"optimizer config changed, use a new --workdir; if the files are damaged, move them aside")
        return None

    def _data_files(self, step: int) -> list[str]:
        """The per-process data-position files (`process_<i>-of-<n>.json`) of checkpoint `step`."""
        path = storage.join(self.directory, str(step), "data")
        return sorted(n for n in storage.listdir(path) if _DATA_FILE.fullmatch(n)) if storage.isdir(path) else []

    def _foreign_data_state(self, step: int, saved: list[str], meta: dict, global_order: bool) -> str:
        """The data position to continue from a checkpoint written by another number of processes: any process's
        file when both the checkpoint and this pipeline have the global order (their positions are all the same);
        otherwise `ProcessCountChangedError`, one line that says why and what to do."""
        written_by = int(_DATA_FILE.fullmatch(saved[0]).group(2))
        count = jax.process_count()
        # One process's stream was already the global order before runs recorded theirs ("data_order" absent).
        saved_global = meta.get("data_order", GLOBAL_ORDER if written_by == 1 else None) == GLOBAL_ORDER
        if global_order and saved_global:
            if jax.process_index() == 0:
                print(f"checkpoint step {step} was written by {written_by} process(es): continuing its global data "
                      f"order on {count}", flush=True)
            return storage.read_text(storage.join(self.directory, str(step), "data", saved[0]))
        why = ("this run's data pipeline gives each process its own stream (packed documents, "
               "data_pipelines/packing.py)" if not global_order else
               "its data position is per process (the run that wrote it read per-process slices)")
        raise ProcessCountChangedError(
            f"checkpoint step {step} in {self.directory} was written by {written_by} process(es) and this run has "
            f"{count}, but {why}, so it cannot continue the same data on {count}: rerun with {written_by} "
            f"process(es) (--num_processes={written_by}), or start over in a new --workdir")

    def _quarantine(self, step: int, error: Exception) -> None:
        _warn(f"WARNING: checkpoint step {step} in {self.directory} is unreadable "
              f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); moved aside as corrupt.{step}.*, "
              f"falling back to the previous one")
        if jax.process_index() == 0:
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


def _warn(message: str) -> None:
    """A warning every process logs and process 0 also prints (the user reads stdout, not the absl log)."""
    logging.warning(message)
    if jax.process_index() == 0:
        print(message, flush=True)


def _data_file_name() -> str:
    """This process's data-position file, as grain's checkpoint handler names it."""
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _warn_if_order_changed(step: int, meta: dict) -> None:
    """A multi-process checkpoint from before runs recorded their data order read per-process slices: the same
    process count continues from the same position of the global order, which holds other batches: say so."""
    written_by = int((meta.get("mesh") or {}).get("process_count", 1))
    if "data_order" not in meta and written_by > 1:
        _warn(f"WARNING: checkpoint step {step} predates the global data order (docs/scaling_out.md §4.1): its "
              f"{written_by} processes read per-process slices; the run continues at the same position of the "
              f"global order, whose batches differ")


def _set_data_state(data_iter, text: str) -> None:
    """Sets a saved data position as grain's checkpoint handler would: JSON for grain iterators, bytes for others
    (the train loop's DevicePrefetcher)."""
    data_iter.set_state(json.loads(text) if isinstance(data_iter, grain.DatasetIterator) else text.encode())
    if hasattr(data_iter, "start_prefetch"):  # grain's restore handler starts a prefetching iterator's threads too
        data_iter.start_prefetch()


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying target shardings (for restoring onto the current mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

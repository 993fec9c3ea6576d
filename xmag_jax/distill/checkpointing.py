"""Orbax checkpoints of a distillation run: train state + Grain iterator state + config/metadata JSON.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta}`. `step` is the number of optimizer updates done;
the data item is the input iterator positioned at the first batch of update `step + 1`, so a restored
run sees exactly the batches an uninterrupted one would. Orbax writes each step to a temporary directory
and renames it when complete, so a save cut by a kill is never listed; a listed step that fails to restore
(corrupt or missing files) is moved to `WORKDIR/checkpoints_corrupt/<step>` and the previous one is tried.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from xmag_jax.data import iterator_restore_args, iterator_save_args

STATE, DATA, META = "state", "data", "meta"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    metadata: dict[str, Any]


def _on_every_process(ok: bool) -> bool:
    """True if `ok` holds on all processes (so that every process falls back to the same step)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


class Checkpointer:
    """Saves every `every` steps (plus forced final saves), keeps the last `keep`, restores the newest good one."""

    def __init__(self, workdir: epath.PathLike, *, every: int, keep: int, async_save: bool = True):
        self.workdir = epath.Path(workdir)
        self.directory = self.workdir / CHECKPOINT_DIR
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA: grain.checkpoint.CheckpointHandler(),
                META: ocp.JsonCheckpointHandler(),
            },
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any, metadata: dict[str, Any], *,
             force: bool = False) -> bool:
        """Start saving `step` if it is on the interval (or `force`); returns whether a save started.

        Returns once the arrays are copied off the devices and the iterator state is written, so `state`
        may be donated to the next step right away; the files are finished in the background.
        """
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(**{
                STATE: ocp.args.StandardSave(state),
                DATA: iterator_save_args(data_iterator),
                META: ocp.args.JsonSave({**metadata, "step": step, "saved_unix_time": time.time()}),
            }),
            force=force,
        )

    def restore_latest(self, abstract_state: Any, data_iterator: Any) -> Restored | None:
        """Restore the newest step that restores cleanly onto `abstract_state`'s shardings, or None.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with the target shardings (any mesh: a
        checkpoint written on 8 devices restores onto 1). `data_iterator` is set to the saved position;
        if no step restores, it is left where it was.
        """
        start_position = data_iterator.get_state()
        for step in reversed(self.all_steps()):
            restored = None
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**{
                    STATE: ocp.args.StandardRestore(abstract_state),
                    DATA: iterator_restore_args(data_iterator),
                    META: ocp.args.JsonRestore(),
                }))
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
                logging.warning("checkpoint step %d in %s does not restore (%s: %s); falling back to the "
                                "previous checkpoint", step, self.directory, type(error).__name__, error)
            if not _on_every_process(restored is not None):
                self._quarantine(step)
                continue
            return Restored(step=step, state=restored[STATE], metadata=dict(restored[META]))
        data_iterator.set_state(start_position)
        return None

    def _quarantine(self, step: int) -> None:
        """Move a bad step out of the manager's directory so it is neither listed nor overwritten."""
        if jax.process_index() == 0:
            source = self.directory / str(step)
            target = self.workdir / CORRUPT_DIR / f"{step}-{int(time.time())}"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                source.rename(target)
                logging.warning("moved unreadable checkpoint %s to %s", source, target)
            except OSError:
                source.rmtree(missing_ok=True)
                logging.warning("deleted unreadable checkpoint %s", source)
        multihost_utils.sync_global_devices(f"xmag_quarantine_checkpoint_{step}")
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True on every process once the job got a preemption notice (multi-host Cloud TPU; else False)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        """Block until background saves are complete (raises if one failed)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

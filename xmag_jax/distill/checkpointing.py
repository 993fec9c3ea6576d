"""Orbax checkpoints of a distillation run: train state + Grain iterator state + config/metadata JSON.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta,digest}`. `step` is the number of optimizer updates
done; the data item is the input iterator positioned at the first batch of update `step + 1`, so a restored
run sees exactly the batches an uninterrupted one would. Orbax writes each step to a temporary directory
and renames it when complete, so a save cut by a kill is never listed.

Verification: the `digest` item holds, for every array of the state, a 64-bit digest of its values computed
on the devices when the step is saved (`state_digests`); a restore recomputes it over the arrays it read and
compares. A listed step that fails to restore (corrupt or missing files) or to verify (bytes changed in
place) is moved to `WORKDIR/checkpoints_corrupt/<step>-<time>` and the previous one is tried, with a warning
naming the step and why. Steps saved before digests existed restore unverified, with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from xmag_jax.data import iterator_restore_args, iterator_save_args

STATE, DATA, META, DIGEST = "state", "data", "meta", "digest"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    metadata: dict[str, Any]


class ProcessCountChangeError(ValueError):
    """A readable checkpoint whose input position cannot be carried over to this number of processes."""


_PROCESS_FILE = re.compile(r"^process_(\d+)-of-(\d+)\.json$")


def _iterator_states_of_other_process_count(data_dir: epath.Path) -> list[dict[str, Any]] | None:
    """The per-process iterator states of a data item written by another process count, else None."""
    found = {}
    for path in data_dir.iterdir() if data_dir.exists() else ():
        match = _PROCESS_FILE.match(path.name)
        if match:
            found[int(match.group(1))] = (int(match.group(2)), path)
    counts = {count for count, _ in found.values()}
    if not found or counts == {jax.process_count()}:
        return None
    (count,) = counts
    if sorted(found) != list(range(count)):
        raise ValueError(f"{data_dir}: iterator states of processes {sorted(found)}, expected 0..{count - 1}")
    return [json.loads(found[i][1].read_text()) for i in range(count)]


def regroup_iterator_state(states: list[dict[str, Any]], process_count: int) -> dict[str, Any]:
    """The state of each of `process_count` processes that continue where the `len(states)` saved ones stopped.

    Relies on the pipeline's slicing: process p of P reads elements p, p + P, p + 2P, ... of the one shuffled
    stream, so P processes that each consumed n elements consumed exactly the first n·P, and P' processes
    continue from n·P / P' each. Exact only for the in-process pipeline (`data.worker_count=0`) with no
    skipped bad record (equal positions); anything else raises `ProcessCountChangeError`.
    """
    keys = {"parent", "bad_records", "records_seen", "last_bad_index"}
    for i, state in enumerate(states):
        if set(state) != keys or set(state["parent"]) != {"next_index"}:
            raise ProcessCountChangeError(
                f"the input position of process {i} ({sorted(state)}) is not the in-process pipeline's "
                "(data.worker_count=0); resume with the same number of processes it was saved with")
    positions = [state["parent"]["next_index"] for state in states]
    if len(set(positions)) != 1 or any(state["bad_records"] for state in states):
        raise ProcessCountChangeError(
            f"the saved processes stopped at different input positions {positions} (bad records skipped); "
            "resume with the same number of processes it was saved with")
    consumed = sum(positions)
    if consumed % process_count:
        raise ProcessCountChangeError(f"{consumed} records consumed do not split over {process_count} processes")
    position = consumed // process_count
    return {"parent": {"next_index": position}, "bad_records": 0, "records_seen": position, "last_bad_index": -1}


class CheckpointVerificationError(ValueError):
    """A restored array's values differ from the digest saved with them (the files changed after the save)."""


def _leaf_digest(x: jax.Array) -> jax.Array:
    """Two 32-bit position-weighted sums of `x`'s bit patterns, `[2]` uint32, the same under any sharding.

    Each element's bits (as uint32 words) are multiplied by odd weights drawn from its flat position and
    summed modulo 2**32: a change of any single element always changes both sums (odd weights are invertible
    mod 2**32), several changes cancel with probability about 2**-64. Computed where the array lives (one
    read of it, no copy to the host), so multi-host states digest as a whole on every process.
    """
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)  # 8-byte values: [..., 2] words
    position = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        position = position + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    first = (position * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15)) | jnp.uint32(1)
    second = ((position ^ jnp.uint32(0x5BD1E995)) * jnp.uint32(0x85EBCA77)) | jnp.uint32(1)
    return jnp.stack([jnp.sum(words * first, dtype=jnp.uint32), jnp.sum(words * second, dtype=jnp.uint32)])


@jax.jit
def _digest_arrays(state: Any) -> Any:
    return jax.tree.map(_leaf_digest, state)


def state_digests(state: Any) -> dict[str, str]:
    """`{leaf path: 16 hex digits}` for every array of `state` (see `_leaf_digest`); blocks until computed."""
    digests = jax.device_get(_digest_arrays(state))
    return {jax.tree_util.keystr(path): f"{int(d[0]):08x}{int(d[1]):08x}"
            for path, d in jax.tree_util.tree_leaves_with_path(digests)}


def verify(step: int, state: Any, saved: dict[str, str] | None) -> None:
    """Raises `CheckpointVerificationError` naming the arrays of `step` whose values differ from `saved`."""
    if saved is None:
        logging.warning("checkpoint step %d has no digests (saved by an older version): restored unverified", step)
        return
    now = state_digests(state)
    bad = sorted(k for k in set(now) | set(saved) if now.get(k) != saved.get(k))
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointVerificationError(f"{len(bad)} of {len(saved)} arrays differ from their saved digests "
                                          f"({shown}): its files were changed or damaged after the save")


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
                DIGEST: ocp.JsonCheckpointHandler(),
            },
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any, metadata: dict[str, Any], *,
             force: bool = False) -> bool:
        """Start saving `step` if it is on the interval (or `force`); returns whether a save started.

        Returns once the arrays are copied off the devices and the iterator state is written, so `state`
        may be donated to the next step right away; the files are finished in the background. The state's
        digests (`state_digests`, one small device computation) are saved with it, in the same step.
        """
        if step in self.manager.all_steps() or not (force or self.manager.should_save(step)):
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(**{
                STATE: ocp.args.StandardSave(state),
                DATA: iterator_save_args(data_iterator),
                META: ocp.args.JsonSave({**metadata, "step": step, "saved_unix_time": time.time()}),
                DIGEST: ocp.args.JsonSave(state_digests(state)),
            }),
            force=force,
        )

    def restore_latest(self, abstract_state: Any, data_iterator: Any) -> Restored | None:
        """Restore the newest step that restores cleanly onto `abstract_state`'s shardings, or None.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with the target shardings (any mesh: a
        checkpoint written on 8 devices restores onto 1). Each step's arrays are checked against its saved
        digests. `data_iterator` is set to the saved position; if no step restores, it is left where it was.
        """
        start_position = data_iterator.get_state()
        for step in reversed(self.all_steps()):
            restored = None
            try:
                restored = self._restore_step(step, abstract_state, data_iterator)
            except ProcessCountChangeError:
                raise
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
                why = "fails verification" if isinstance(error, CheckpointVerificationError) else "does not restore"
                logging.warning("checkpoint step %d in %s %s (%s: %s); falling back to the previous checkpoint",
                                step, self.directory, why, type(error).__name__, error)
            if not _on_every_process(restored is not None):
                self._quarantine(step)
                continue
            return Restored(step=step, state=restored[STATE], metadata=dict(restored[META]))
        data_iterator.set_state(start_position)
        return None

    def _restore_step(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
        has_digest = (self.directory / str(step) / DIGEST).exists()
        if has_digest:
            items[DIGEST] = ocp.args.JsonRestore()
        saved = _iterator_states_of_other_process_count(self.directory / str(step) / DATA)
        if saved is None:
            items[DATA] = iterator_restore_args(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        verify(step, restored[STATE], dict(restored[DIGEST]) if has_digest else None)
        if saved is not None:
            data_iterator.set_state(regroup_iterator_state(saved, jax.process_count()))
            logging.info("checkpoint step %d was written by %d processes: input position regrouped for %d",
                         step, len(saved), jax.process_count())
        return restored

    def _quarantine(self, step: int) -> None:
        """Move a bad step out of the manager's directory so it is neither listed nor overwritten."""
        if jax.process_index() == 0:
            source = self.directory / str(step)
            target = self.workdir / CORRUPT_DIR / f"{step}-{int(time.time())}"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                source.rename(target)
                logging.warning("moved bad checkpoint %s to %s", source, target)
            except OSError:
                source.rmtree(missing_ok=True)
                logging.warning("deleted bad checkpoint %s", source)
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

"""Saving the input iterator with the model: Grain's Orbax handler as one item of a composite checkpoint.

    mngr = ocp.CheckpointManager(workdir / "checkpoints", options=...)
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=iterator_save_args(iterator)))
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          data=iterator_restore_args(iterator)))
    # `iterator` now continues where the saved one stopped; restored["data"] is the same object.

Grain's handler writes `process_{i}-of-{n}.json` (each process its own slice's state) and is a blocking
handler in Orbax 0.12's composite save, so the state is captured during `save()` even with async saving;
the iterator may advance right after `save()` returns.
"""

from __future__ import annotations

import grain


def iterator_save_args(iterator: grain.DatasetIterator) -> grain.checkpoint.CheckpointSave:
    """Orbax args saving `iterator`'s state (the pipeline position and the bad-record counts)."""
    return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DatasetIterator) -> grain.checkpoint.CheckpointRestore:
    """Orbax args restoring a saved state into `iterator` (built from the same config, seed and process)."""
    return grain.checkpoint.CheckpointRestore(iterator)

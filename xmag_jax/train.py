r"""Distill a 20x teacher into a 5x student: `python -m xmag_jax.train --config configs/NAME.py --workdir DIR`.

    python -m xmag_jax.train --config configs/debug.py --workdir /tmp/xmag_debug \
        --config.data.dir=demo_out/pairs --config.total_steps=20

`--config.KEY=VALUE` overrides any config value; `configs/NAME.py:ARG` passes ARG to `get_config`.
`--workdir` is a local path or gs://; it holds `checkpoints/`, `metrics.jsonl` and `tensorboard/`, and a
run started again with the same workdir resumes from its newest readable checkpoint.

Multi-host: pass `--coordinator_address host:port --num_processes N --process_id I` on every host, or
`--distributed` on Cloud TPU (auto-detected cluster). Each process reads its own slice of the data;
batches become global arrays sharded over the mesh.
"""

from __future__ import annotations

import logging as std_logging
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from xmag_jax import data, sharding
from xmag_jax.distill import config_validation, step as step_lib
from xmag_jax.distill.checkpointing import Checkpointer
from xmag_jax.distill.metrics import MetricWriter, NonFiniteLossError, Throughput, check_finite, log_progress, to_floats
from xmag_jax.teacher_cache import spec as teacher_cache_spec

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:ARG]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or gs://): checkpoints, metrics, TensorBoard.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-host runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() with cluster auto-detection.")


def initialize_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
                           auto: bool) -> None:
    """Join the multi-host job before anything touches the devices (no-op for a single process)."""
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
    if all(given):
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif auto:
        jax.distributed.initialize()


class _PendingMetrics:
    """Metrics of the last dispatched step, read one step late so the host never waits on the device."""

    def __init__(self, config: ml_collections.ConfigDict, writer: MetricWriter, throughput: Throughput):
        self.config, self.writer, self.throughput = config, writer, throughput
        self._pending: tuple[int, dict[str, Any], np.ndarray] | None = None

    def push(self, step: int, metrics: dict[str, Any], record_index: np.ndarray) -> None:
        self.flush()
        self._pending = (step, metrics, record_index)

    def flush(self) -> None:
        """Wait for the pending step, stop on NaN/Inf, write its metrics."""
        if self._pending is None:
            return
        step, metrics, record_index = self._pending
        self._pending = None
        values = to_floats(metrics)
        check_finite(step, values)
        values.update(self.throughput.tick())
        logged = step % self.config.log_every == 0 or step == self.config.total_steps
        self.writer.write(step, values, log_point=logged,
                          record_index=record_index if self.config.log_record_index else None)
        if logged:
            log_progress(step, self.config.total_steps, values)


def _metadata(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "mesh": dict(mesh.shape),
        "process_count": jax.process_count(),
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
    }


def _warn_config_changes(saved: dict[str, Any], config: ml_collections.ConfigDict) -> None:
    """A resumed run with other values (batch, seed, data) no longer replays the uninterrupted one: say so."""
    before, now = config_validation.flatten(saved), config_validation.flatten(config)
    changed = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)}
    if changed:
        logging.warning("resuming with config changes since the checkpoint (key: saved -> now): %s",
                        ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))


def train(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """Run (or resume) the distillation in `workdir`; returns the final train state."""
    config_validation.check_config(config)
    mesh = sharding.make_mesh(config.mesh)
    config_validation.check_against_mesh(config, mesh)
    step_lib.validate(config)
    if config.data.teacher_cache:
        teacher_cache_spec.check(config)  # refuses a cache of another teacher, dataset, states (before compiling)

    trainer = step_lib.make_trainer(config, mesh)
    iterator = data.make_iterator(config.data, seed=config.seed, batch_size=config.batch_size // jax.process_count())
    checkpointer = Checkpointer(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    writer = MetricWriter(workdir)

    restored = checkpointer.restore_latest(trainer.abstract_state(), iterator)
    if restored is None:
        state, start = trainer.init_state(jax.random.key(config.seed)), 0
        source = f"the parameters of {config.student.init}" if config.student.init else f"seed {config.seed}"
        logging.info("starting from scratch in %s; student %s from %s (student.init)", workdir,
                     config.student.name, source)
    else:
        state, start = restored.state, restored.step
        logging.info("resumed from checkpoint step %d in %s (its own student; student.init is not re-applied)",
                     start, workdir)
        _warn_config_changes(restored.metadata.get("config", {}), config)
    writer.resume_at(start)  # drops lines a killed run wrote after its last checkpoint (all, if it had none)
    teacher = trainer.teacher_state()  # None with data.teacher_cache

    throughput = Throughput(batch_size=config.batch_size, flops_per_step=trainer.flops_per_step().total,
                            peak_tflops_per_device=config.peak_tflops_per_device, device_count=jax.device_count(),
                            views=trainer.views)
    pending = _PendingMetrics(config, writer, throughput)
    metadata = _metadata(config, mesh)
    step = start
    try:
        for step in range(start + 1, config.total_steps + 1):
            batch = next(iterator)
            record_index = batch.pop("record_index")
            state, metrics = trainer.step(state, teacher, data.global_batch(batch, trainer.batch_shardings))
            pending.push(step, metrics, record_index)
            final = step == config.total_steps
            preempted = checkpointer.reached_preemption(step)
            if final or preempted or step % config.checkpoint.every == 0:
                pending.flush()  # never checkpoint a state whose step went NaN
                checkpointer.save(step, state, iterator, metadata, force=final or preempted)
                throughput.reset()
            if preempted:
                logging.warning("preemption notice: saved step %d, stopping; rerun to resume", step)
                break
        pending.flush()
        logging.info("done at step %d of %d; checkpoints in %s", step, config.total_steps, checkpointer.directory)
    except NonFiniteLossError as error:
        checkpointer.wait()
        good = checkpointer.all_steps()
        raise NonFiniteLossError(f"{error}; stopped without saving it, the last good checkpoint is step "
                                 f"{good[-1] if good else None} in {checkpointer.directory}") from error
    finally:
        checkpointer.wait()
        checkpointer.close()
        writer.close()
    return state


class _DropOrbaxInfo(std_logging.Filter):
    """Orbax logs every stage of every save at INFO; keep its warnings and errors, and our progress lines."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_DropOrbaxInfo())
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value)
    epath.Path(_WORKDIR.value).mkdir(parents=True, exist_ok=True)
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except (config_validation.ConfigError, NonFiniteLossError) as error:
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)

r"""Distill a 20x teacher into a 5x student: `python -m xmag_jax.train --config configs/NAME.py --workdir DIR`.

    python -m xmag_jax.train --config configs/debug.py --workdir /tmp/xmag_debug \
        --config.data.dir=demo_out/pairs --config.total_steps=20

`--config.KEY=VALUE` overrides any config value; `configs/NAME.py:ARG` passes ARG to `get_config`.
`--workdir` is a local path or gs://; it holds `checkpoints/`, `metrics.jsonl` and `tensorboard/`, and a
run started again with the same workdir resumes from its newest readable checkpoint.

Multi-host: pass `--coordinator_address host:port --num_processes N --process_id I` on every host, or
`--distributed` on Cloud TPU (auto-detected cluster). Each process reads its own slice of the data;
batches become global arrays sharded over the mesh.

Exit status: 0 done; 2 bad config or workdir in use by another run (one line on stderr); 1 a NaN/Inf stop;
143 stopped by SIGTERM (preemption) and 130 by SIGINT (Ctrl-C), each after saving the step it had reached,
from which the same command resumes.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils

from xmag_jax import chips, cli, data, errors, sharding, workdir_lock
from xmag_jax.data import distributed
from xmag_jax.distill import config_validation
from xmag_jax.distill import step as step_lib
from xmag_jax.distill.checkpointing import Checkpointer
from xmag_jax.distill.metrics import MetricWriter, NonFiniteLossError, Throughput, check_finite, log_progress, to_floats
from xmag_jax.teacher_cache import spec as teacher_cache_spec

PROG = "python -m xmag_jax.train"


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "Run directory (local or gs://): checkpoints, metrics, TensorBoard.",
                        flag_values=fv)
    distributed.define_distributed(fv)


COMMAND = cli.Command(PROG, _define, doc=__doc__, required=("config", "workdir"),
                      config=(None, "Config file (configs/NAME.py[:ARG])."),
                      known_keys=lambda: config_validation.flatten(config_validation.schema.base_config()))


def _peak_flops(config: ml_collections.ConfigDict) -> float | None:
    """The devices' dense bf16 peak for MFU (`config.peak_tflops_per_device` overrides the chip table)."""
    peak = chips.peak_flops_per_device(jax.devices(), config.get("peak_tflops_per_device"))
    kind = jax.devices()[0].device_kind
    if peak is None:
        logging.info("MFU: not applicable on %s (no known peak; set peak_tflops_per_device to override)", kind)
    else:
        logging.info("MFU against %.0f TFLOP/s per device (%s)", peak / 1e12,
                     "peak_tflops_per_device" if config.get("peak_tflops_per_device") else kind)
    return peak


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


class Stopped(Exception):
    """The run stopped on SIGTERM/SIGINT (or a preemption notice) after saving `step`; rerun to resume."""

    def __init__(self, signum: int, step: int, directory: Any):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} after saving step {step} in {directory}; "
                         "run the same command to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's status for "terminated by signal": 143 SIGTERM, 130 SIGINT


class _StopSignals:
    """SIGTERM and SIGINT set a flag that the loop reads at step boundaries (a second SIGINT interrupts at once).

    One process: the flag is read every step. Several processes: JAX's preemption service already catches
    SIGTERM on each process and agrees on one step to stop at through the coordination service
    (`Checkpointer.reached_preemption`, read every step at no device cost); SIGINT is turned into a SIGTERM of
    this process so it takes the same path. Handlers are installed only from the main thread.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if jax.process_count() > 1:
            signal.raise_signal(signal.SIGTERM)  # to JAX's preemption notifier (its handler is not ours)
            return
        logging.warning("%s: saving a checkpoint at the end of this step, then stopping (again to abort)",
                        signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        wanted = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
        self._previous = {s: signal.signal(s, self._handle) for s in wanted}
        try:
            yield self
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, handler)


@contextlib.contextmanager
def _workdir_held(workdir: str) -> Iterator[None]:
    """`workdir_lock` on `workdir` for the run (process 0 takes it; every process fails together if it cannot)."""
    held, lock = None, None
    if jax.process_index() == 0:
        try:
            lock = workdir_lock.acquire(workdir, job="train")
        except workdir_lock.WorkdirLocked as error:
            held = error
    if jax.process_count() > 1:
        ok = bool(multihost_utils.broadcast_one_to_all(np.asarray(held is None)))
        if not ok and held is None:
            held = workdir_lock.WorkdirLocked(f"{workdir}: in use by another run (process 0 could not lock it)")
    if held is not None:
        raise held
    try:
        yield
    finally:
        if lock is not None:
            workdir_lock.release(lock)


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
    """Run (or resume) the distillation in `workdir`; returns the final train state.

    Raises `ConfigError` before anything is compiled, `WorkdirLocked` if another run holds `workdir`,
    `NonFiniteLossError` on NaN/Inf (that step is not saved), `Stopped` after saving on SIGTERM/SIGINT.
    """
    config_validation.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    if config.data.teacher_cache:
        teacher_cache_spec.check(config)  # refuses a cache of another teacher, dataset, states (before compiling)
    with _StopSignals().installed() as stop, _workdir_held(workdir):  # a signal once the lock exists is caught
        return _train(config, workdir, stop)


def _train(config: ml_collections.ConfigDict, workdir: str, stop: _StopSignals) -> Any:
    mesh = sharding.make_mesh(config.mesh)
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
                            peak_flops_per_device=_peak_flops(config), device_count=jax.device_count(),
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
            stopping = preempted or (jax.process_count() == 1 and stop.signum is not None)
            if final or stopping or step % config.checkpoint.every == 0:
                pending.flush()  # never checkpoint a state whose step went NaN
                checkpointer.save(step, state, iterator, metadata, force=final or stopping)
                throughput.reset()
            if stopping and not final:
                checkpointer.wait()
                raise Stopped(stop.signum or signal.SIGTERM, step, checkpointer.directory)
        pending.flush()
        logging.info("done at step %d of %d; checkpoints in %s", step, config.total_steps, checkpointer.directory)
    except NonFiniteLossError as error:
        checkpointer.wait()
        saved = checkpointer.all_steps()
        if restored is not None and error.step == start + 1:
            where = (f"it is the first step after restoring checkpoint step {start}, so that checkpoint (or a "
                     "config change since it) is the likely cause")
        else:
            where = f"the newest checkpoint is step {saved[-1] if saved else None}"
        raise NonFiniteLossError(f"{error}; stopped without saving it; {where} ({checkpointer.directory})",
                                 error.step) from error
    finally:
        checkpointer.wait()
        checkpointer.close()
        writer.close()
    return state


class _DropOrbaxInfo(std_logging.Filter):
    """Orbax logs every stage of every save at INFO; keep its warnings and errors, and our progress lines."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str] | None = None) -> int:
    """The command line (`argv` without the program name): every error a person can fix is one line on stderr
    (see the module's exit status)."""
    prog = PROG
    try:
        fv, _ = COMMAND.parse(argv)
        cli.start_absl_logging()
        logging.get_absl_handler().addFilter(_DropOrbaxInfo())
        distributed.initialize_distributed(fv)
        train(fv.config, fv.workdir)
    except errors.UserError as error:  # a flag, ConfigError, WorkdirLocked
        errors.report(error, prog)
        return errors.EXIT_USER_ERROR
    except NonFiniteLossError as error:
        errors.report(error, prog)
        return 1
    except Stopped as stopped:
        logging.warning("%s", stopped)
        print(f"{prog}: {stopped}", file=sys.stderr, flush=True)
        return stopped.exit_code
    return 0


if __name__ == "__main__":
    errors.run_cli(main, prog=PROG)

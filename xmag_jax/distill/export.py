"""The student of a distillation run as a model checkpoint (`xmag_jax.models.checkpoint` layout).

    python -m xmag_jax.distill.export --workdir RUN --out student          # newest step (EMA weights if kept)
    python -m xmag_jax.distill.export --workdir RUN --step 2000 --out student
    python -m xmag_jax.distill.export --workdir RUN --initial --out baseline  # the run's student before training
    python -m xmag_jax.distill.export --random_init vit_s14 --out baseline  # untrained registry student

Only the student is written: the projectors (and their BatchNorm statistics) are training-only.
The result feeds `python -m xmag_jax.convert export --checkpoint student --out DIR` (timm / PyTorch) and
`python -m xmag_jax.embed --checkpoint student`.
"""

from __future__ import annotations

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import flags
from etils import epath
from flax import nnx

from xmag_jax import cli, errors, sharding
from xmag_jax.distill import config_validation
from xmag_jax.distill import step as step_lib
from xmag_jax.distill.checkpointing import CHECKPOINT_DIR, DIGEST, META, STATE, verify
from xmag_jax.models import checkpoint as model_checkpoint
from xmag_jax.models import registry
from xmag_jax.models.vit import VisionTransformer


def student_from_workdir(workdir: str, step: int | None = None, initial: bool = False
                         ) -> tuple[VisionTransformer, str]:
    """Restore the student (EMA parameters when the run kept an EMA) of `workdir`'s checkpoint `step`
    (default: the newest). With `initial`, the student the run started from instead: its config's init
    (`student.init` checkpoint, or seed and `student.layer_scale_init`) before any update, the fair baseline
    for that run. Returns `(model, registry name)`; the model lives on one device. The restored arrays are
    checked against the digests saved with them. Reading is safe while the run is still training (its lock
    is not needed)."""
    directory = epath.Path(workdir) / CHECKPOINT_DIR
    manager = ocp.CheckpointManager(
        directory, item_handlers={STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler(),
                                   DIGEST: ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    steps = sorted(manager.all_steps())
    if not steps:
        raise errors.UserError(f"{directory}: no complete checkpoint (is {workdir} a distillation workdir?)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise errors.UserError(f"{directory}: no checkpoint for step {step}; have {steps}")
    meta = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    config = ml_collections.ConfigDict(meta["config"])
    config.mesh.data, config.mesh.fsdp = 1, 1
    config.batch_size = config.optim.grad_accum
    if not initial and config.student.get("init"):
        config.student.init = ""  # the trained student comes from the run's checkpoint, not from its init
    try:
        config_validation.validate(config, num_devices=1, files=False)  # the run's own config, on one device
    except errors.ConfigError as error:
        raise errors.ConfigError(f"{directory}/{step}/{META}: the run's config: {error}") from error
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    trainer = step_lib.make_trainer(config, mesh)
    if initial:
        state = trainer.init_state(jax.random.key(config.seed))
    else:
        items = {STATE: ocp.args.StandardRestore(trainer.abstract_state())}
        has_digest = (directory / str(step) / DIGEST).exists()
        if has_digest:
            items[DIGEST] = ocp.args.JsonRestore()
        restored = manager.restore(step, args=ocp.args.Composite(**items))
        state = restored[STATE]
        try:
            verify(step, state, dict(restored[DIGEST]) if has_digest else None)
        except ValueError as error:
            raise errors.UserError(f"{directory}/{step}: {error}") from error
    manager.close()
    student = registry.create_model(config.student.name, rngs=nnx.Rngs(0),
                                    scan_layers=bool(config.student.get("scan_layers", False)))
    nnx.update(student, state.student_params)
    return student, config.student.name


PROG = "python -m xmag_jax.distill.export"


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "distillation run directory (the train command's --workdir)",
                        flag_values=fv)
    flags.DEFINE_string("random_init", None, "registry name of an untrained student to write", flag_values=fv)
    flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)", flag_values=fv)
    flags.DEFINE_bool("initial", False, "with --workdir: the run's student before its first update (same config "
                      "and seed)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of --random_init", flag_values=fv)
    flags.DEFINE_string("out", None, "model checkpoint directory to write (must not exist)", flag_values=fv)


COMMAND = cli.Command(PROG, _define, doc=__doc__, required=("out",), one_of=(("workdir", "random_init"),))


def main(argv: list[str] | None = None) -> int:
    args, _ = COMMAND.parse(argv)
    if args.initial and not args.workdir:
        raise errors.UserError("--initial needs --workdir")
    if args.workdir:
        model, name = student_from_workdir(args.workdir, args.step, args.initial)
    else:
        name = args.random_init
        if name not in registry.ARCHS:
            raise errors.UserError(f"--random_init: unknown model {name!r}; known: {', '.join(sorted(registry.ARCHS))}")
        model = registry.create_model(name, rngs=nnx.Rngs(args.seed))
    try:
        path = model_checkpoint.save_model(args.out, model, name)
    except FileExistsError as error:
        raise errors.UserError(f"--out: {error}") from error
    print(f"wrote {name} student to {path}")
    return 0


if __name__ == "__main__":
    errors.run_cli(main, prog=PROG)

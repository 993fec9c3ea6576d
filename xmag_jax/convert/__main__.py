"""`python -m xmag_jax.convert import --model NAME --weights FILE --out DIR` |
`python -m xmag_jax.convert export --checkpoint PATH --out DIR`.

Import reads timm `model.safetensors`/`pytorch_model.bin`, DINOv2's torch.hub `.pth`, XMAG's released `.ckpt`
or a transformers Dinov2Model's `model.safetensors` (`xmag_jax.convert.layouts`)."""

from __future__ import annotations

import functools

from absl import flags

from xmag_jax import cli, errors
from xmag_jax.models.registry import ARCHS


class CheckpointIOError(errors.UserError):
    """The output exists, or the model checkpoint to export cannot be read."""


PROG = "python -m xmag_jax.convert"


def _define_import(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("model", None, f"registry name: {', '.join(ARCHS)}", flag_values=fv)
    flags.DEFINE_string("weights", None, "model.safetensors, pytorch_model.bin, DINOv2 .pth or XMAG release .ckpt",
                        flag_values=fv)
    flags.DEFINE_string("out", None, "checkpoint directory to create", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace --out if it exists", flag_values=fv)


def _define_export(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "Orbax model checkpoint directory", flag_values=fv)
    flags.DEFINE_string("out", None, "directory for timm.create_model('local-dir:DIR')", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace --out if it exists", flag_values=fv)


COMMANDS = {
    "import": cli.Command(f"{PROG} import", _define_import, required=("model", "weights", "out"),
                          doc="released weights (timm, DINOv2, XMAG, transformers Dinov2) -> Orbax model checkpoint"),
    "export": cli.Command(f"{PROG} export", _define_export, required=("checkpoint", "out"),
                          doc="Orbax model checkpoint -> timm config.json + model.safetensors"),
}


def _run(command: str, argv: list[str]) -> int:
    args, _ = COMMANDS[command].parse(argv)
    from xmag_jax.convert.timm_io import export_timm, import_timm

    try:
        if command == "import":
            _, path = import_timm(args.model, args.weights, args.out, overwrite=args.overwrite)
            print(f"wrote model checkpoint {path}")
        else:
            path = export_timm(args.checkpoint, args.out, overwrite=args.overwrite)
            print(f"wrote {path}/config.json and model.safetensors; load with "
                  f"timm.create_model('local-dir:{path}', pretrained=True)")
    except errors.UserError:
        raise
    except (FileExistsError, FileNotFoundError, ValueError) as e:  # models.checkpoint's save/load errors
        raise CheckpointIOError(str(e)) from e
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.dispatch(PROG, {c: functools.partial(_run, c) for c in COMMANDS}, argv, doc=__doc__)


if __name__ == "__main__":
    errors.run_cli(main, prog=PROG)

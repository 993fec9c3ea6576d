"""`python -m xmag_jax.convert import --model NAME --weights FILE --out DIR` |
`python -m xmag_jax.convert export --checkpoint PATH --out DIR`.

Import reads timm `model.safetensors`/`pytorch_model.bin`, DINOv2's torch.hub `.pth`, XMAG's released `.ckpt`
or a transformers Dinov2Model's `model.safetensors` (`xmag_jax.convert.layouts`)."""

from __future__ import annotations

import argparse

from xmag_jax import errors
from xmag_jax.models.registry import ARCHS


class CheckpointIOError(errors.UserError):
    """The output exists, or the model checkpoint to export cannot be read."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmag_jax.convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="released weights (timm, DINOv2, XMAG, transformers Dinov2) -> "
                                        "Orbax model checkpoint")
    imp.add_argument("--model", required=True, help=f"registry name: {', '.join(ARCHS)}")
    imp.add_argument("--weights", required=True,
                     help="model.safetensors, pytorch_model.bin, DINOv2 .pth or XMAG release .ckpt")
    imp.add_argument("--out", required=True, help="checkpoint directory to create")
    imp.add_argument("--overwrite", action="store_true")
    exp = sub.add_parser("export", help="Orbax model checkpoint -> timm config.json + model.safetensors")
    exp.add_argument("--checkpoint", required=True)
    exp.add_argument("--out", required=True, help="directory for timm.create_model('local-dir:DIR')")
    exp.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from xmag_jax.convert.timm_io import export_timm, import_timm

    try:
        if args.command == "import":
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


if __name__ == "__main__":
    errors.run_cli(main, prog="python -m xmag_jax.convert")

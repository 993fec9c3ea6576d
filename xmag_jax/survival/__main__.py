"""`python -m xmag_jax.survival --config configs/celleconet.py --workdir DIR [--config.KEY=VALUE ...]`.

Reads the clinical CSV and every slide's features, checks them all (one-line errors, exit 2, before anything is
compiled), then cross-validates the models of `config.models` on the same folds and writes `DIR/results.json`
and `DIR/km_{model}.png`. Rerun with the same arguments to resume: finished (fold, model) units are kept.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

from absl import flags

from xmag_jax import cli, errors, workdir_lock

PROG = "python -m xmag_jax.survival"


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "Run directory: run.json, units/, checkpoints/, results.json, km_*.png.",
                        flag_values=fv)


COMMAND = cli.Command(PROG, _define, doc=__doc__, required=("config", "workdir"),
                      config=(None, "Config file (configs/celleconet.py[:ARG])."))


def main(argv: Sequence[str] | None = None) -> int:
    fv, _ = COMMAND.parse(argv)
    config, workdir = fv.config, pathlib.Path(fv.workdir)
    from xmag_jax.survival import clinical as clinical_lib
    from xmag_jax.survival import cv
    from xmag_jax.survival import slides as slides_lib

    cv.check_config(config)
    clinical = clinical_lib.read_clinical(config.data.clinical, tuple(config.data.covariates))
    absent = [c for c in config.eval.subgroups if c not in clinical.covariates]
    if absent:
        raise errors.ConfigError(f"config.eval.subgroups: {absent} are not covariate columns of {config.data.clinical} "
                                 f"(covariates: {list(clinical.covariates)})")
    slides, empty = slides_lib.load_slides(config.data.features, clinical.slide_ids, use_tokens=config.data.use_tokens)
    if empty:
        print(f"skipping {len(empty)} slide(s) with no tiles: {empty}", file=sys.stderr)
        clinical = clinical.subset([s.slide_id for s in slides])
    cv.assign_folds(clinical, config.folds, config.seed)  # "not enough events" before any compile
    words = (f"{slides[0].words.shape[1]} token words per tile" if slides[0].words.shape[1] > 1
             else "tile embeddings as words")
    print(f"{len(slides)} slides, {int(clinical.event.sum())} events, {config.folds} folds, {words}; "
          f"models {list(config.models)}", flush=True)
    with workdir_lock.hold(workdir, job="survival"):
        results = cv.run(config, workdir, slides, clinical, log=lambda s: print(s, flush=True))
    for name, m in results["models"].items():
        print(f"{name:>20}: C-index {m['c_index_mean']:.3f}  AUC@{results['auc_months']:g}m {m['auc_mean']:.3f}  "
              f"HR {m['hazard_ratio_mean']:.2f}  (pooled HR {m['pooled']['hazard_ratio']:.2f}, "
              f"log-rank p {m['pooled']['logrank_p']:.2g})")
    print(f"wrote {workdir / 'results.json'}")
    return 0


if __name__ == "__main__":
    errors.run_cli(main, prog=PROG)

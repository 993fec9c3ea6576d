"""The synthetic task where space matters: the spatial model must beat the position-free ones there, and not on the
control cohort (amounts decide) — all three neural models on the same folds, at CI size (~90 slides, 3 folds)."""

import numpy as np
import pytest

from configs import celleconet_debug
from data_prep import synthetic_survival as ss
from xmag_jax.survival import clinical, cv
from xmag_jax.survival import slides as slides_lib

N_SLIDES = 90


def _cross_validate(tmp_path, cohort: str) -> dict:
    slides, rows = ss.make_cohort(N_SLIDES, cohort, seed=0, min_side=6, max_side=8)
    ss.write_features(tmp_path / "features", slides)
    ss.write_clinical(tmp_path, rows, slides)
    config = celleconet_debug.get_config()
    config.models = ("spatial", "abmil", "transformer_no_pos")
    clin = clinical.read_clinical(tmp_path / "clinical.csv")
    loaded, _ = slides_lib.load_slides(tmp_path / "features", clin.slide_ids)
    results = cv.run(config, tmp_path / "run", loaded, clin, log=print)
    c = {name: m["c_index_mean"] for name, m in results["models"].items()}
    print(cohort, c)
    return c


@pytest.mark.slow
def test_spatial_model_wins_only_where_the_arrangement_decides(tmp_path):
    spatial = _cross_validate(tmp_path / "spatial", "spatial")
    assert spatial["spatial"] > max(spatial["abmil"], spatial["transformer_no_pos"]) + 0.03, spatial
    control = _cross_validate(tmp_path / "amount", "amount")
    assert min(control.values()) > 0.65, control  # every model reads amounts
    assert max(control.values()) - min(control.values()) < 0.1, control
    assert np.isfinite(list(spatial.values())).all()

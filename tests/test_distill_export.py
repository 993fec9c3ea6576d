"""The trained student leaves a distillation workdir as a model checkpoint: EMA weights when kept,
loadable by `models.checkpoint.load_model` (and so by `convert export` and `embed`)."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import debug
from xmag_jax import errors, train, workdir_lock
from xmag_jax.data.synthetic_pairs import write_pair_shards
from xmag_jax.distill import export
from xmag_jax.models import checkpoint as model_checkpoint
from xmag_jax.models import registry


def test_export_writes_the_ema_student(tmp_path):
    write_pair_shards(tmp_path / "pairs", 8, num_shards=1)
    config = debug.get_config()
    config.data.dir = str(tmp_path / "pairs")
    config.total_steps, config.batch_size = 3, 8
    config.optim.warmup_steps, config.optim.ema_decay = 1, 0.5
    config.checkpoint.every, config.log_every = 3, 1
    state = train.train(config, str(tmp_path / "run"))

    with workdir_lock.hold(tmp_path / "run", job="train"):  # a run still training there: reading is fine
        assert export.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "student")]) == 0
    model, arch = model_checkpoint.load_model(tmp_path / "student")
    assert arch.name == config.student.name
    exported = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    expected = jax.tree.leaves(nnx.to_pure_dict(jax.device_get(state.ema)))
    trained = jax.tree.leaves(nnx.to_pure_dict(jax.device_get(state.params["student"])))
    assert len(exported) == len(expected) > 0
    for a, b in zip(exported, expected):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(a, b) for a, b in zip(expected, trained)), "EMA equals raw params: test is void"

    # --initial: the run's student before its first update, with the config's LayerScale init (not the registry's).
    assert export.main(["--workdir", str(tmp_path / "run"), "--initial", "--out", str(tmp_path / "initial")]) == 0
    initial, _ = model_checkpoint.load_model(tmp_path / "initial")
    params = nnx.to_pure_dict(nnx.state(initial, nnx.Param))
    np.testing.assert_array_equal(params["blocks"][0]["ls1"]["gamma"], config.student.layer_scale_init)
    assert config.student.layer_scale_init != registry.get_arch(config.student.name).vit.init_values
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), exported) if a.size > 1)


def _cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        errors.run_cli(export.main, prog="export", argv=argv)
    return exit_info.value.code


def test_export_errors_name_the_problem(tmp_path, capsys):
    assert _cli(["--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export: error: ") and "no complete checkpoint" in err and err.count("\n") == 1
    assert _cli(["--random_init", "vit_test", "--out", str(tmp_path / "r")]) == 0
    assert model_checkpoint.read_arch(tmp_path / "r").name == "vit_test"
    assert _cli(["--random_init", "vit_test", "--out", str(tmp_path / "r")]) == 2
    assert "--out: " in capsys.readouterr().err
    assert _cli(["--random_init", "vit_tst", "--out", str(tmp_path / "t")]) == 2
    assert "unknown model 'vit_tst'" in capsys.readouterr().err
    with pytest.raises(errors.UserError, match="--initial needs --workdir"):
        export.main(["--random_init", "vit_test", "--initial", "--out", str(tmp_path / "i")])

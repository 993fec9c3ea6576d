"""The configs follow the schema of xmag_jax/config.py, and bad values fail before compile naming the key."""

import importlib

import jax
import pytest

from xmag_jax import config as common
from xmag_jax.distill import config_validation as cv

REAL_CONFIGS = ("xmag_uni2h_vitb14", "uni2h_vits14", "virchow2_vits14", "hoptimus1_vits14")


@pytest.mark.parametrize("name", ("debug", "demo") + REAL_CONFIGS)
def test_configs_follow_the_schema(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    cv.check_schema(config)
    cv.check_values(config)


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_configs_are_real_size(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.batch_size >= 256
    assert config.total_steps * config.batch_size >= common.XMAG_NUM_PAIRS
    assert config.teacher.dtype == "bfloat16"
    assert config.teacher.checkpoint and not config.teacher.allow_random_teacher
    assert "python -m xmag_jax.train" in importlib.import_module(f"configs.{name}").__doc__


def test_xmag_recipe_config_has_the_released_values():
    from configs import xmag_uni2h_vitb14 as recipe

    c = recipe.get_config()
    assert c.data.augment.preset == "xmag" and c.data.views == 2
    assert (c.teacher.name, c.student.name, c.batch_size, c.total_steps) == ("uni2_h", "vit_b14", 1152, 30295)
    assert c.student.init and c.student.layer_scale_init is None
    assert (c.loss.projector_norm, c.loss.projector_hidden, c.data.views) == ("batch", 1536, 2)
    assert (c.loss.global_weight, c.loss.tile_weight, c.loss.token_weight) == (1.0, 0.5, 0.0)
    assert (c.optim.lr, c.optim.weight_decay, c.optim.clip_norm, c.optim.ema_decay) == (5e-4, 0.05, 1.0, 0.999)
    assert c.optim.warmup_steps == 3029  # one epoch of 3.49 M pairs
    assert recipe.get_config("literal_warmup").optim.warmup_steps == c.total_steps - 1
    with pytest.raises(ValueError, match="unknown argument 'short'"):
        recipe.get_config("short")


def test_unknown_key_is_named_with_a_suggestion():
    config = importlib.import_module("configs.debug").get_config()
    config.optim.weight_decy = 0.1
    with pytest.raises(cv.ConfigError, match=r"'optim.weight_decy' is not a known key.*'optim.weight_decay'"):
        cv.check_schema(config)


def test_missing_key_is_named():
    config = importlib.import_module("configs.debug").get_config()
    del config.checkpoint["keep"]
    with pytest.raises(cv.ConfigError, match=r"'checkpoint.keep' is missing"):
        cv.check_schema(config)


@pytest.mark.parametrize("key, value, pattern", [
    ("total_steps", 0, "total_steps: must be >= 1"),
    ("loss.mode", "both", "loss.mode: must be one of"),
    ("teacher.sharding", "tp", "teacher.sharding: must be one of"),
    ("checkpoint.keep", 0, "checkpoint.keep: must be >= 1"),
    ("data.views", 0, "data.views: must be >= 1"),
    ("loss.projector_norm", "layer", "loss.projector_norm: must be one of"),
])
def test_bad_values_are_named(key, value, pattern):
    config = importlib.import_module("configs.debug").get_config()
    group, _, leaf = key.rpartition(".")
    (config[group] if group else config)[leaf] = value
    with pytest.raises(cv.ConfigError, match=pattern):
        cv.check_values(config)


def test_missing_teacher_checkpoint_is_named(tmp_path):
    config = importlib.import_module("configs.uni2h_vits14").get_config()
    config.teacher.checkpoint = str(tmp_path / "no_such_teacher")
    with pytest.raises(cv.ConfigError, match="teacher.checkpoint: .*no_such_teacher.* does not exist"):
        cv.check_files(config)
    config.teacher.checkpoint = ""
    with pytest.raises(cv.ConfigError, match="teacher.checkpoint: is empty"):
        cv.check_files(config)


def test_missing_shards_are_named(tmp_path):
    config = importlib.import_module("configs.debug").get_config()
    config.data.dir = str(tmp_path)
    with pytest.raises(cv.ConfigError, match="data.dir: .* has no shards for split 'train'"):
        cv.check_files(config)


@pytest.mark.parametrize("key", ["dir", "teacher_cache"])
def test_pair_shards_on_an_object_store_need_a_mount(key):
    """ArrayRecord reads local files: a gs:// data folder is one line naming the gcsfuse mount to use instead
    of a traceback from inside the input pipeline."""
    config = importlib.import_module("configs.debug").get_config()
    config.data[key] = "gs://bucket/pairs"
    with pytest.raises(cv.ConfigError, match=rf"data.{key}: 'gs://bucket/pairs' is on an object store.*/gcs/BUCKET"):
        cv.check_files(config)


def test_batch_must_divide_by_data_parallel_size():
    config = importlib.import_module("configs.debug").get_config()
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    config.batch_size = 12
    with pytest.raises(cv.ConfigError, match="batch_size: 12 pairs does not divide by data-parallel size 8"):
        cv.check_against_mesh(config, mesh)
    config.batch_size = 16
    config.optim.grad_accum = 4
    with pytest.raises(cv.ConfigError, match="optim.grad_accum 4 = 32"):
        cv.check_against_mesh(config, mesh)
    config.optim.grad_accum = 2
    cv.check_against_mesh(config, mesh)

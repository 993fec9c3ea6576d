"""Model checkpoints: an Orbax checkpoint of the parameters plus the architecture as JSON.

Layout of `path/`: `params/` (Orbax StandardCheckpointer, the `nnx.Param` state as a nested dict keyed
like timm: `blocks/0/attn/qkv/kernel`, ...) and `arch.json` (`{"name": ..., "vit": ViTConfig fields}`),
so non-registry overrides such as a reduced depth round-trip. The blocks are always stored per block, as
timm has them; a scanned model (`ViTConfig.scan_layers`) is unstacked on save and restored onto a scanned
target by stacking (`vit.stack_blocks`), so the layout on disk does not depend on how a model runs. The
directory is written with `atomic.target` (locally under a temporary name and renamed; on Cloud Storage,
`gs://` through etils.epath, uploaded with `arch.json` last), so a present `path/arch.json` means a complete
checkpoint. Checkpoints are written to and read from a local path or Cloud Storage.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from xmag_jax import atomic
from xmag_jax.models.registry import Arch, get_arch
from xmag_jax.models.vit import VisionTransformer, ViTConfig, stack_blocks, unstack_blocks

ARCH_FILE = "arch.json"
PARAMS_DIR = "params"


def save_model(path: str | os.PathLike, model: VisionTransformer, arch_name: str, *, overwrite: bool = False,
               multiprocessing_options: ocp.options.MultiprocessingOptions | None = None) -> epath.Path:
    """Write `model`'s parameters and architecture to the directory `path` (local or gs://; created; must not
    exist unless `overwrite`). Returns the absolute path. `multiprocessing_options`: Orbax's, e.g. one process
    of a multi-host job writing alone (its parameters then host values or fully replicated)."""
    path = atomic.as_path(path)
    get_arch(arch_name)
    if path.exists() and not overwrite:
        raise FileExistsError(f"checkpoint directory {path} already exists")
    with atomic.target(path, directory=True, marker=ARCH_FILE) as tmp:
        params = unstack_blocks(nnx.to_pure_dict(nnx.state(model, nnx.Param)), model.cfg.depth)
        options = {} if multiprocessing_options is None else {"multiprocessing_options": multiprocessing_options}
        with ocp.StandardCheckpointer(**options) as ckptr:
            ckptr.save(tmp / PARAMS_DIR, params)
        vit = dataclasses.replace(model.cfg, scan_layers=False)
        (tmp / ARCH_FILE).write_text(json.dumps({"name": arch_name, "vit": vit.to_dict()}, indent=2))
    return path


def read_arch(path: str | os.PathLike, **vit_overrides: Any) -> Arch:
    """The architecture stored in checkpoint `path` (registry entry + saved ViTConfig + overrides)."""
    path = atomic.as_path(path)
    arch_file = path / ARCH_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"model checkpoint {path} does not exist (expected a directory from save_model)")
    if not arch_file.is_file() or not (path / PARAMS_DIR).is_dir():
        raise ValueError(f"{path} is not a complete model checkpoint: expected {ARCH_FILE} and {PARAMS_DIR}/")
    try:
        meta = json.loads(arch_file.read_text())
        vit = ViTConfig(**{**meta["vit"], **vit_overrides})
        arch = get_arch(meta["name"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{arch_file}: unreadable architecture ({type(e).__name__}: {e})") from e
    return dataclasses.replace(arch, vit=vit)


def load_params(path: str | os.PathLike, abstract_state: nnx.State) -> nnx.State:
    """Restore the parameters of checkpoint `path` onto `abstract_state` (an `nnx.State` of Params whose
    values are `jax.ShapeDtypeStruct`s, with `.sharding` set for a sharded restore, else on the default
    device). Arrays are restored in the abstract dtypes. A scanned target (stacked `blocks`) is filled from
    the per-block checkpoint and stacked on its own shardings. Returns the filled state."""
    params_dir = atomic.as_path(path) / PARAMS_DIR
    if not params_dir.is_dir():
        raise FileNotFoundError(f"model checkpoint parameters {params_dir} do not exist")
    target = nnx.to_pure_dict(abstract_state)
    stacked = target.get("blocks")
    if stacked is not None and not all(isinstance(k, int) for k in stacked):
        depth = jax.tree.leaves(stacked)[0].shape[0]
        per_block = {**target, "blocks": {i: jax.tree.map(_drop_leading_axis, stacked) for i in range(depth)}}
        restored = _restore(params_dir, per_block)
        shardings = jax.tree.map(_sharding_of, stacked)
        restored["blocks"] = jax.jit(lambda b: stack_blocks({"blocks": b})["blocks"],
                                     out_shardings=shardings)(restored["blocks"])
        nnx.replace_by_pure_dict(abstract_state, restored)
        return abstract_state
    nnx.replace_by_pure_dict(abstract_state, _restore(params_dir, target))
    return abstract_state


def _restore(params_dir: epath.Path, target: dict) -> dict:
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restore_target = jax.tree.map(
                lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=_sharding_of(t)), target)
            restored = ckptr.restore(params_dir, restore_target)
        except Exception as e:  # orbax raises many types for mismatched or corrupt trees
            raise ValueError(f"cannot restore parameters from {params_dir}: {type(e).__name__}: {e}") from e
    return restored


def _drop_leading_axis(t: Any) -> jax.ShapeDtypeStruct:
    """The abstract of one block's slice of a stacked `[depth, ...]` parameter, on the matching sharding."""
    sharding = getattr(t, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (len(t.shape) - len(sharding.spec))
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
    return jax.ShapeDtypeStruct(t.shape[1:], t.dtype, sharding=sharding)


def load_model(path: str | os.PathLike, *, dtype: str | None = None,
               param_dtype: str | None = None) -> tuple[VisionTransformer, Arch]:
    """Rebuild the model saved at `path` on the default device; `dtype`/`param_dtype` override the
    saved compute/parameter dtypes. Returns `(model, arch)`."""
    overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
    arch = read_arch(path, **overrides)
    abstract = nnx.eval_shape(lambda: VisionTransformer(arch.vit, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    params = load_params(path, params)
    return nnx.merge(graphdef, params, rest), arch


def _sharding_of(t: Any) -> jax.sharding.Sharding:
    sharding = getattr(t, "sharding", None)
    return sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


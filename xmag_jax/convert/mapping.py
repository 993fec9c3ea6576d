"""The one key table between the Flax ViT's parameters and timm's state dict, used in both directions.

Flax leaf paths (`nnx.to_pure_dict` keys, e.g. `('blocks', 3, 'attn', 'qkv', 'kernel')`) map to timm keys
by joining with '.' and renaming the leaf: Linear `kernel [in, out]` <-> `weight [out, in]`, Conv
`kernel [p, p, 3, D]` <-> `weight [D, 3, p, p]`, LayerNorm `scale` <-> `weight`, `bias`, LayerScale
`gamma`, and the bare `cls_token`, `reg_token`, `pos_embed`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from xmag_jax.errors import UserError

_LEAF_TO_TIMM = {"kernel": "weight", "scale": "weight", "bias": "bias", "gamma": "gamma"}
_TOP_LEVEL = ("cls_token", "reg_token", "pos_embed")


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One parameter: its Flax path, timm key and the layout change between them."""

    flax_path: tuple
    timm_key: str
    layout: str  # 'same' | 'linear' (transpose) | 'conv' (HWIO <-> OIHW)

    def to_timm(self, x: np.ndarray) -> np.ndarray:
        if self.layout == "linear":
            return x.T
        if self.layout == "conv":
            return x.transpose(3, 2, 0, 1)
        return x

    def from_timm(self, x: np.ndarray) -> np.ndarray:
        if self.layout == "linear":
            return x.T
        if self.layout == "conv":
            return x.transpose(2, 3, 1, 0)
        return x

    def timm_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.to_timm(np.empty(flax_shape, np.bool_)).shape)


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def key_table(flax_params: Mapping) -> list[KeyRule]:
    """The rules for every leaf of a nested Flax parameter dict (values need only `.ndim`/`.shape`)."""
    rules = []
    for path, leaf in _flatten(flax_params).items():
        *module, name = (str(p) for p in path)
        if not module and name in _TOP_LEVEL:
            rules.append(KeyRule(path, name, "same"))
            continue
        if name not in _LEAF_TO_TIMM:
            raise ValueError(f"no timm name for Flax parameter {'/'.join(map(str, path))}")
        layout = "same"
        if name == "kernel":
            layout = "conv" if len(leaf.shape) == 4 else "linear"
        rules.append(KeyRule(path, ".".join(module + [_LEAF_TO_TIMM[name]]), layout))
    return rules


class WeightsError(UserError, ValueError):
    """A weights file that cannot be imported: the message names the file and what was expected."""


class StateDictMismatch(WeightsError):
    """Weights that do not fit the architecture: every missing/unexpected key and shape mismatch, by name."""


def from_timm(state_dict: Mapping[str, np.ndarray], flax_abstract: Mapping, source: str) -> dict:
    """timm state dict -> nested Flax parameter dict with the structure/shapes of `flax_abstract`.

    Raises one `StateDictMismatch` naming `source` and listing all problems.
    """
    rules = key_table(flax_abstract)
    shapes = {r.flax_path: tuple(leaf.shape) for r, leaf in zip(rules, _flatten(flax_abstract).values())}
    expected = {r.timm_key for r in rules}
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    mismatched = []
    for r in rules:
        if r.timm_key in state_dict:
            want = r.timm_shape(shapes[r.flax_path])
            got = tuple(state_dict[r.timm_key].shape)
            if got != want:
                mismatched.append(f"{r.timm_key}: checkpoint {list(got)} vs model {list(want)}")
    if missing or unexpected or mismatched:
        lines = [f"weights {source} do not match the architecture:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        raise StateDictMismatch("\n".join(lines))
    out: dict = {}
    for r in rules:
        node = out
        for p in r.flax_path[:-1]:
            node = node.setdefault(p, {})
        node[r.flax_path[-1]] = r.from_timm(np.asarray(state_dict[r.timm_key]))
    return out


def to_timm(flax_params: Mapping) -> dict[str, np.ndarray]:
    """Nested Flax parameter dict of numpy arrays -> timm state dict (contiguous numpy arrays)."""
    leaves = _flatten(flax_params)
    return {r.timm_key: np.ascontiguousarray(r.to_timm(np.asarray(leaves[r.flax_path])))
            for r in key_table(flax_params)}

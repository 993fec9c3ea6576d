"""Paired augmentation: one random draw applied to the 5x tile and to the 20x region of the same field.

Both images show the same level-0 field (5x: `[224, 224, 3]` at ~2.0 µm/px, 20x: `[896, 896, 3]` at
~0.5 µm/px), so every transform here is defined in field coordinates and applied to each image whole:

- D4 (`d4`): one of the 8 rotations/flips of the square; the 20x region is transformed as a whole
  *before* it is cut into its 4x4 tiles, so tile k of the mosaic still shows the part of the field that
  the student's token block k sees.
- Colour jitter (`color`): brightness (×), contrast (around the image's mean grey), saturation (towards
  luma grey) and hue (rotation about the grey axis), all from one draw.
- HED stain jitter (`hed`, Tellez et al. 2018): optical density → Ruifrok–Johnston H/E/DAB stain
  concentrations → per-stain scale α and shift β → back to RGB.

Presets (`preset`, the config's `data.augment.preset`) name a whole recipe; the other keys override it:

- `d4_color_hed` (default): all 8 D4 elements, colour jitter on every pair (factors in [0.9, 1.1], hue
  in [-0.03, 0.03] turns) and HED stain jitter.
- `xmag`: XMAG's released recipe: horizontal flip p = 0.5 and vertical flip p = 0.5 (independent; so the
  identity, the two mirrors and the half turn, no quarter turns), and with p = 0.5 colour jitter with
  brightness, contrast, saturation factors in [0.95, 1.05] and hue in [-0.05, 0.05] turns (torchvision's
  `ColorJitter(0.05, 0.05, 0.05, 0.05)`: its hue is a fraction of the hue circle); no HED, no crop. Two
  named differences from torchvision remain: the hue turns about the RGB grey axis rather than shifting the
  HSV hue channel, and the four jitters run in one fixed order instead of a random one.

`student_only`: the photometric jitter (colour, HED) goes to the 5x image only; the teacher sees the clean
20x field. The D4 transform stays shared, because the teacher's tile targets must stay aligned with the
student's token grid.

All functions take and return uint8 NHWC-less images `[H, W, 3]`; work is numpy-vectorised in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from xmag_jax.errors import ConfigError

# Ruifrok & Johnston (2001) stain optical-density vectors, rows H, E, DAB (as scikit-image's rgb_from_hed).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
# ITU-R BT.601 luma weights, as torchvision's grayscale.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)
LN_255 = float(np.log(255.0))


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
    """Which augmentations run, and their strengths (each drawn uniformly in the stated range).

    `d4`: geometric augmentation: the full D4 group, or only the flips (each p = 0.5) with `flips_only`.
    `color_p`: probability that a pair gets the colour jitter at all (1: every pair).
    """

    preset: str = "d4_color_hed"
    d4: bool = True
    flips_only: bool = False
    color: bool = True
    color_p: float = 1.0
    hed: bool = True
    student_only: bool = False
    brightness: float = 0.1  # factor in [1 - b, 1 + b]
    contrast: float = 0.1  # factor in [1 - c, 1 + c]
    saturation: float = 0.1  # factor in [1 - s, 1 + s]
    hue: float = 0.03  # rotation in [-h, h] turns
    hed_scale: float = 0.05  # per-stain α in [1 - a, 1 + a]
    hed_shift: float = 0.05  # per-stain β in [-b, b], stain optical-density units

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> AugmentOptions:
        """From the config's `data.augment` section: its `preset` (default `d4_color_hed`), with every other
        key that is not None overriding the preset's value. Unknown keys or presets are a ConfigError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"data.augment: unknown keys {unknown}; expected a subset of {sorted(known)}")
        name = cfg.get("preset") or cls.preset
        if name not in PRESETS:
            raise ConfigError(f"data.augment.preset: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **{k: cfg[k] for k in cfg if k != "preset" and cfg[k] is not None})


PRESETS = {
    "d4_color_hed": AugmentOptions(),
    "xmag": AugmentOptions(preset="xmag", flips_only=True, color_p=0.5, hed=False,
                           brightness=0.05, contrast=0.05, saturation=0.05, hue=0.05),
}
# D4 element (see AugmentDraw) of (horizontal flip, vertical flip): a mirror, a half turn + mirror, a half turn.
FLIPS_TO_D4 = {(False, False): 0, (True, False): 4, (False, True): 6, (True, True): 2}


@dataclasses.dataclass(frozen=True)
class AugmentDraw:
    """One random draw, shared by both magnifications.

    `d4`: 0..7, rotate by `d4 % 4` quarter turns counter-clockwise, then mirror left-right if `d4 >= 4`.
    `color`: `[3, 3]` matrix on RGB row vectors (brightness · saturation · hue), with its `brightness` and
    `contrast` factors (the contrast pivot is the brightness-scaled mean grey); `saturation` and `hue`
    (turns) record the rest of that draw.
    `hed`: `[3, 3]` matrix and `hed_bias [3]` on log-intensity row vectors `ln(max(v, 1))` (v in 0..255):
    the stain jitter in optical density `od = ln 255 - ln v` is affine, so it stays affine in `ln v`.
    Disabled parts are None.
    """

    d4: int
    color: np.ndarray | None
    brightness: float
    contrast: float
    hed: np.ndarray | None
    hed_bias: np.ndarray | None
    saturation: float = 1.0
    hue: float = 0.0


def _hue_rotation(turns: float) -> np.ndarray:
    """Rotation of RGB row vectors about the grey axis (1, 1, 1)/√3 by `turns` full turns."""
    theta = 2.0 * np.pi * turns
    u = np.full(3, 1.0 / np.sqrt(3.0))
    cross = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    column_form = np.cos(theta) * np.eye(3) + (1.0 - np.cos(theta)) * np.outer(u, u) + np.sin(theta) * cross
    return column_form.T


def color_matrix(brightness: float, saturation: float, hue: float) -> np.ndarray:
    """`[3, 3]` float32 matrix on RGB row vectors: scale by `brightness`, blend towards luma grey by
    `saturation` (1 keeps, 0 greys out), rotate the hue by `hue` turns about the grey axis."""
    desaturate = saturation * np.eye(3) + (1.0 - saturation) * np.outer(LUMA, np.ones(3))
    return (brightness * desaturate @ _hue_rotation(hue)).astype(np.float32)


def hed_matrices(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stain jitter `c' = α c + β` of the H, E, DAB concentrations c, as (`[3, 3]`, `[3]`) float32 acting on
    log-intensity row vectors `ln v` (`od = ln 255 - ln v`, `c = od @ HED_FROM_RGB`, `od = c @ RGB_FROM_HED`)."""
    matrix = HED_FROM_RGB @ np.diag(alpha) @ RGB_FROM_HED
    bias = LN_255 * (1.0 - matrix.sum(axis=0)) - np.asarray(beta) @ RGB_FROM_HED
    return matrix.astype(np.float32), bias.astype(np.float32)


def draw(options: AugmentOptions, rng: np.random.Generator) -> AugmentDraw:
    """Draws every parameter (always in the same order, so toggling one option leaves the others' draws;
    the flips and the colour coin replace or follow the draws of the default preset, which stay as they were)."""
    if options.flips_only:
        horizontal, vertical = (rng.random(2) < 0.5).tolist()
        d4 = FLIPS_TO_D4[horizontal, vertical]
    else:
        d4 = int(rng.integers(8))
    brightness, contrast, saturation = 1.0 + rng.uniform(-1.0, 1.0, 3) * np.array(
        [options.brightness, options.contrast, options.saturation]
    )
    hue = rng.uniform(-options.hue, options.hue)
    alpha = 1.0 + rng.uniform(-options.hed_scale, options.hed_scale, 3)
    beta = rng.uniform(-options.hed_shift, options.hed_shift, 3)
    hed, hed_bias = hed_matrices(alpha, beta) if options.hed else (None, None)
    jitter = options.color and (options.color_p >= 1.0 or bool(rng.random() < options.color_p))
    return AugmentDraw(
        d4=d4 if options.d4 else 0,
        color=color_matrix(brightness, saturation, hue) if jitter else None,
        brightness=float(brightness),
        contrast=float(contrast),
        hed=hed,
        hed_bias=hed_bias,
        saturation=float(saturation),
        hue=float(hue),
    )


def apply_d4(image: np.ndarray, d4: int) -> np.ndarray:
    """`[H, W, C]` → the D4 element `d4` of it (a view): `d4 % 4` quarter turns CCW, then a mirror if `d4 >= 4`."""
    out = np.rot90(image, k=d4 % 4, axes=(0, 1))
    return out[:, ::-1] if d4 >= 4 else out


def apply_photometric(image: np.ndarray, d: AugmentDraw) -> np.ndarray:
    """HED then colour jitter of a uint8 `[H, W, 3]` image → uint8 `[H, W, 3]` (the input itself if neither)."""
    if d.hed is None and d.color is None:
        return image
    if d.hed is not None:
        log_rgb = np.maximum(image, 1).astype(np.float32)
        np.log(log_rgb, out=log_rgb)
        rgb = log_rgb @ d.hed
        rgb += d.hed_bias
        np.exp(rgb, out=rgb)
    else:
        rgb = image.astype(np.float32)
    offset = 0.5  # rounds to nearest in the final cast, which truncates
    if d.color is not None:
        grey_mean = float(np.mean(rgb @ LUMA.astype(np.float32)))
        rgb = rgb @ (d.contrast * d.color)
        # Saturation and hue map grey to itself, so the contrast pivot passes through them unchanged.
        offset += (1.0 - d.contrast) * d.brightness * grey_mean
    rgb += offset
    np.clip(rgb, 0.0, 255.5, out=rgb)
    return rgb.astype(np.uint8)


def augment_pair(
    image_5x: np.ndarray, image_20x: np.ndarray, options: AugmentOptions, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One draw applied to both images (uint8 `[224, 224, 3]` and `[896, 896, 3]`), see the module doc.

    Returns the 5x image contiguous and the 20x region as a possibly strided view (`cut_tiles` copies it).
    Photometric jitter runs before D4: it is per pixel, and runs faster on the decoder's contiguous arrays.
    """
    d = draw(options, rng)
    student = np.ascontiguousarray(apply_d4(apply_photometric(image_5x, d), d.d4))
    teacher_draw = dataclasses.replace(d, color=None, hed=None, hed_bias=None) if options.student_only else d
    teacher = apply_d4(apply_photometric(image_20x, teacher_draw), d.d4)
    return student, teacher

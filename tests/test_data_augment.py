"""Paired augmentation: one D4/colour/HED draw for both magnifications, tile order following the field."""

import dataclasses

import numpy as np
import pytest

from xmag_jax.data import augment
from xmag_jax.data.pairs import cut_tiles
from xmag_jax.errors import ConfigError

PX5, PX20, BLOCK = 224, 896, 56  # 5x tile, 20x region, 5x block under one 20x tile (px)


def _same_field(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A 5x image with texture and its exact 4x nearest-neighbour upsample as the 20x region."""
    small = rng.integers(30, 230, size=(PX5 // 8, PX5 // 8, 3)).astype(np.uint8)
    image_5x = np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)
    return image_5x, np.repeat(np.repeat(image_5x, 4, axis=0), 4, axis=1)


def _mosaic(tiles: np.ndarray) -> np.ndarray:
    return tiles.reshape(4, 4, 224, 224, 3).swapaxes(1, 2).reshape(PX20, PX20, 3)


def _draws_covering_d4(options: augment.AugmentOptions) -> dict[int, int]:
    """Seed giving each of the 8 D4 elements."""
    seeds = {}
    for seed in range(200):
        seeds.setdefault(augment.draw(options, np.random.default_rng(seed)).d4, seed)
    assert sorted(seeds) == list(range(8))
    return seeds


# Where the field's top-left 20x tile lands (row-major index) under each D4 element.
TOP_LEFT_GOES_TO = {0: 0, 1: 12, 2: 15, 3: 3, 4: 3, 5: 15, 6: 12, 7: 0}


@pytest.mark.parametrize("student_only", [False, True])
def test_d4_is_shared_and_tiles_follow_the_field(student_only):
    options = augment.AugmentOptions(color=False, hed=False, student_only=student_only)
    image_5x = np.full((PX5, PX5, 3), 100, np.uint8)
    image_5x[:BLOCK, :BLOCK] = 250  # marked top-left corner of the field
    image_5x[:BLOCK, BLOCK : 2 * BLOCK, 0] = 10  # and its right neighbour, so mirrors are not rotations
    image_20x = np.repeat(np.repeat(image_5x, 4, axis=0), 4, axis=1)
    for d4, seed in _draws_covering_d4(options).items():
        out_5x, out_20x = augment.augment_pair(image_5x, image_20x, options, np.random.default_rng(seed))
        tiles = cut_tiles(out_20x)
        assert tiles.shape == (16, 224, 224, 3) and tiles.dtype == np.uint8
        np.testing.assert_array_equal(out_20x[::4, ::4], out_5x)
        marked = [k for k in range(16) if (tiles[k] == 250).all()]
        assert marked == [TOP_LEFT_GOES_TO[d4]], d4
        for k in range(16):  # student token block k and teacher tile k show the same part of the field
            r, c = divmod(k, 4)
            np.testing.assert_array_equal(out_5x[r * BLOCK : (r + 1) * BLOCK, c * BLOCK : (c + 1) * BLOCK],
                                          tiles[k][::4, ::4])


def test_cut_tiles_is_row_major():
    region = np.zeros((PX20, PX20, 3), np.uint8)
    for k in range(16):
        r, c = divmod(k, 4)
        region[r * 224 : (r + 1) * 224, c * 224 : (c + 1) * 224] = k
    tiles = cut_tiles(region)
    assert [int(tiles[k].min()) for k in range(16)] == list(range(16))
    assert [int(tiles[k].max()) for k in range(16)] == list(range(16))


def test_colour_and_hed_draw_identical_across_magnifications():
    options = augment.AugmentOptions(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1,
                                     hed_scale=0.2, hed_shift=0.2)
    rng = np.random.default_rng(0)
    image_5x, image_20x = _same_field(rng)
    outputs = []
    for seed in range(4):
        out_5x, out_20x = augment.augment_pair(image_5x, image_20x, options, np.random.default_rng(seed))
        # The 20x field, seen at the 5x grid, got exactly the 5x tile's transform (rounding aside).
        assert np.abs(out_20x[::4, ::4].astype(int) - out_5x).max() <= 1
        outputs.append(out_5x.astype(float))
    # ... and the draws really differ between elements: per-channel means move by several grey levels.
    channel_means = np.array([o.mean(axis=(0, 1)) for o in outputs])
    assert np.ptp(channel_means, axis=0).max() > 5.0
    assert np.abs(outputs[0] - image_5x).mean() > 2.0


def test_student_only_leaves_the_teacher_field_clean():
    options = augment.AugmentOptions(student_only=True, brightness=0.3, hed_scale=0.2)
    image_5x, image_20x = _same_field(np.random.default_rng(1))
    rng_seed = 3
    d4 = augment.draw(options, np.random.default_rng(rng_seed)).d4
    out_5x, out_20x = augment.augment_pair(image_5x, image_20x, options, np.random.default_rng(rng_seed))
    np.testing.assert_array_equal(out_20x, augment.apply_d4(image_20x, d4))
    assert np.abs(out_5x.astype(int) - augment.apply_d4(image_5x, d4)).mean() > 2.0


def test_zero_strength_is_identity():
    options = augment.AugmentOptions(d4=False, brightness=0, contrast=0, saturation=0, hue=0, hed_scale=0, hed_shift=0)
    image_5x, image_20x = _same_field(np.random.default_rng(2))
    out_5x, out_20x = augment.augment_pair(image_5x, image_20x, options, np.random.default_rng(0))
    np.testing.assert_array_equal(out_5x, image_5x)
    np.testing.assert_array_equal(out_20x, image_20x)


def test_hed_jitter_matches_ruifrok_stain_space_reference():
    image = np.random.default_rng(3).integers(0, 256, size=(32, 32, 3)).astype(np.uint8)
    alpha, beta = np.array([1.1, 0.9, 1.05]), np.array([0.05, -0.04, 0.02])
    matrix, bias = augment.hed_matrices(alpha, beta)
    d = augment.AugmentDraw(d4=0, color=None, brightness=1.0, contrast=1.0, hed=matrix, hed_bias=bias)
    # Reference: RGB -> optical density -> H/E/DAB concentrations -> α c + β -> back, all in float64.
    od = -np.log(np.maximum(image, 1) / 255.0)
    stains = (od @ augment.HED_FROM_RGB) * alpha + beta
    expected = np.clip(255.0 * np.exp(-(stains @ augment.RGB_FROM_HED)), 0, 255)
    assert np.abs(augment.apply_photometric(image, d).astype(float) - expected).max() <= 1.0


def test_colour_jitter_factors():
    image = np.random.default_rng(4).integers(0, 200, size=(16, 16, 3)).astype(np.uint8)
    base = augment.AugmentDraw(d4=0, color=None, brightness=1.0, contrast=1.0, hed=None, hed_bias=None)

    def jitter(brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0):
        color = augment.color_matrix(brightness, saturation, hue)
        d = dataclasses.replace(base, color=color, brightness=brightness, contrast=contrast)
        return augment.apply_photometric(image, d).astype(float)

    assert np.abs(jitter(brightness=1.2) - np.clip(image * 1.2, 0, 255)).max() <= 1.0
    grey = image @ augment.LUMA
    assert np.abs(jitter(saturation=0.0) - grey[..., None]).max() <= 1.0
    assert np.abs(jitter(contrast=0.0) - grey.mean()).max() <= 1.0
    # A third of a turn about the grey axis permutes the channels cyclically.
    rotated = jitter(hue=1.0 / 3.0)
    assert any(np.abs(rotated - np.roll(image, shift, axis=-1)).max() <= 1.0 for shift in (1, 2))


def test_unknown_augment_key_is_named():
    with pytest.raises(ValueError, match="colour"):
        augment.AugmentOptions.from_config({"d4": True, "colour": True})


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match=r"'xmag2'.*\['d4_color_hed', 'xmag'\]"):
        augment.AugmentOptions.from_config({"preset": "xmag2"})


def test_config_presets_and_overrides():
    from configs.debug import get_config

    data = get_config().data
    assert augment.AugmentOptions.from_config(data.augment) == augment.AugmentOptions()
    data.augment.preset = "xmag"
    xmag = augment.AugmentOptions.from_config(data.augment)
    assert (xmag.flips_only, xmag.color_p, xmag.hed, xmag.d4, xmag.color) == (True, 0.5, False, True, True)
    data.augment.color = False  # an explicit key overrides the preset; None keeps the preset's
    assert augment.AugmentOptions.from_config(data.augment).color is False


def test_xmag_preset_parameter_ranges_match_the_released_recipe():
    options = augment.PRESETS["xmag"]
    draws = [augment.draw(options, np.random.default_rng(seed)) for seed in range(4000)]
    flips = np.array([[d.d4 in (4, 2), d.d4 in (6, 2)] for d in draws])  # (horizontal, vertical)
    assert {d.d4 for d in draws} == {0, 2, 4, 6}, "flips only: no quarter turns"
    assert np.allclose(flips.mean(0), 0.5, atol=0.03)
    assert abs(np.corrcoef(flips.T)[0, 1]) < 0.05, "the two flips are independent"
    jittered = [d for d in draws if d.color is not None]
    assert abs(len(jittered) / len(draws) - 0.5) < 0.03 and all(d.hed is None for d in draws)
    for name, bound in (("brightness", 0.05), ("contrast", 0.05), ("saturation", 0.05), ("hue", 0.05)):
        values = np.array([getattr(d, name) for d in jittered]) - (0.0 if name == "hue" else 1.0)
        assert np.abs(values).max() <= bound and values.min() < -0.95 * bound and values.max() > 0.95 * bound, name
    # The horizontal flip mirrors left-right, the vertical one top-bottom.
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    np.testing.assert_array_equal(augment.apply_d4(image, augment.FLIPS_TO_D4[True, False]), image[:, ::-1])
    np.testing.assert_array_equal(augment.apply_d4(image, augment.FLIPS_TO_D4[False, True]), image[::-1])


def test_xmag_preset_draw_is_shared_by_both_magnifications():
    options = augment.PRESETS["xmag"]
    image_5x, image_20x = _same_field(np.random.default_rng(5))
    image_5x[:BLOCK, :BLOCK] = 250
    image_20x[: 4 * BLOCK, : 4 * BLOCK] = 250
    seen = set()
    for seed in range(24):
        d = augment.draw(options, np.random.default_rng(seed))
        out_5x, out_20x = augment.augment_pair(image_5x, image_20x, options, np.random.default_rng(seed))
        assert np.abs(out_20x[::4, ::4].astype(int) - out_5x).max() <= 1
        changed = np.abs(out_5x.astype(int) - augment.apply_d4(image_5x, d.d4)).mean() > 0.3
        assert changed == (d.color is not None), seed  # no jitter: the flip alone, exactly
        seen.add((d.d4, d.color is not None))
    assert len(seen) >= 6

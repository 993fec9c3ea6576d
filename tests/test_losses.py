"""XMAG loss terms on small hand-computed arrays and the 5x/20x token-mapping geometry."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from xmag_jax.distill import losses


def _loss_cfg(**kw):
    c = ml_collections.ConfigDict(
        dict(global_weight=1.0, global_smooth_l1_weight=0.0, tile_weight=1.0, token_weight=1.0, mode="dual")
    )
    c.update(kw)
    return c


def test_cosine_distance_hand_computed():
    pred = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    target = jnp.array([[2.0, 0.0], [-1.0, -1.0], [3.0, 0.0]])
    # distances 0 (same direction), 2 (opposite), 1 (orthogonal)
    np.testing.assert_allclose(losses.cosine_distance(pred, target), (0.0 + 2.0 + 1.0) / 3, atol=1e-6)


def test_smooth_l1_hand_computed():
    pred = jnp.array([0.0, 0.0, 0.0, 0.0])
    target = jnp.array([0.5, -0.5, 2.0, -3.0])
    # 0.5·x² inside |x| <= 1, |x| - 0.5 outside
    expected = (0.125 + 0.125 + 1.5 + 2.5) / 4
    np.testing.assert_allclose(losses.smooth_l1(pred, target), expected, atol=1e-6)


def test_student_blocks_and_teacher_mosaic_geometry():
    """A student grid / teacher mosaic whose field tile k holds constant feature k maps block k to k."""
    g = 8
    tile_id = (np.arange(g)[:, None] // (g // 4)) * 4 + (np.arange(g)[None, :] // (g // 4))
    student = jnp.asarray(tile_id, jnp.float32)[None, :, :, None]  # [1, 8, 8, 1]
    blocks = losses.student_tile_blocks(student)
    np.testing.assert_array_equal(np.asarray(blocks)[0, :, 0], np.arange(16))

    gt = 3  # teacher tiles of 3x3 tokens -> 12x12 mosaic
    tiles = jnp.broadcast_to(jnp.arange(16, dtype=jnp.float32)[None, :, None, None, None], (2, 16, gt, gt, 1))
    mosaic = np.asarray(losses.teacher_mosaic(tiles))
    assert mosaic.shape == (2, 12, 12, 1)
    np.testing.assert_array_equal(mosaic[0, :, :, 0], np.kron(np.arange(16).reshape(4, 4), np.ones((gt, gt))))

    # token level: the 12x12 mosaic pooled to a 4x4 student grid gives tile k at token k.
    pooled = np.asarray(losses.pool_to_grid(jnp.asarray(mosaic), 4))
    np.testing.assert_array_equal(pooled[1, :, :, 0], np.arange(16).reshape(4, 4))
    # pooled to an 12x12 grid (identity) and to 2x2 (each token averages a 2x2 block of tiles)
    np.testing.assert_array_equal(np.asarray(losses.pool_to_grid(jnp.asarray(mosaic), 12)), mosaic)
    two = np.asarray(losses.pool_to_grid(jnp.asarray(mosaic), 2))[0, :, :, 0]
    np.testing.assert_allclose(two, [[(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4],
                                     [(8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]])


def test_token_pooling_averages_teacher_tokens_of_the_field():
    """Each student token's target is the mean of the teacher tokens covering the same area."""
    rng = np.random.default_rng(0)
    tiles = rng.normal(size=(1, 16, 4, 4, 3)).astype(np.float32)  # 16x16 mosaic
    t = losses.teacher_targets(jnp.zeros((1, 16, 5)), jnp.asarray(tiles), student_grid=8)
    # student token (row 3, col 6) covers mosaic rows 6..7, cols 12..13 = tile (1, 3) rows 2..3, cols 0..1
    expected = tiles[0, 1 * 4 + 3, 2:4, 0:2].mean(axis=(0, 1))
    np.testing.assert_allclose(np.asarray(t.tokens)[0, 3, 6], expected, rtol=1e-6)


def test_targets_and_total_hand_computed():
    emb = jnp.zeros((1, 16, 2)).at[0, :, 0].set(1.0).at[0, 5, :].set(jnp.array([0.0, 16.0]))
    t = losses.teacher_targets(emb, None, student_grid=4)
    np.testing.assert_allclose(t.global_, [[15 / 16, 1.0]])
    assert t.tokens is None
    pred = losses.Predictions(
        global_=jnp.array([[15.0, 16.0]]),  # parallel to the target: distance 0
        tiles=jnp.ones((1, 16, 2)).at[0, :, 1].set(0.0),  # right except tile 5 (orthogonal: 1)
        tokens=None,
    )
    w = losses.LossWeights.from_config(_loss_cfg(token_weight=0.0, tile_weight=2.0, global_smooth_l1_weight=0.5))
    terms = losses.xmag_losses(pred, t, w)
    assert set(terms) == {"global", "global_smooth_l1", "tile", "total"}
    np.testing.assert_allclose(terms["global"], 0.0, atol=1e-6)
    np.testing.assert_allclose(terms["tile"], 1 / 16, atol=1e-6)
    sl1 = ((15 - 15 / 16) - 0.5 + (16 - 1) - 0.5) / 2
    np.testing.assert_allclose(terms["global_smooth_l1"], sl1, rtol=1e-6)
    np.testing.assert_allclose(terms["total"], 2.0 / 16 + 0.5 * sl1, rtol=1e-6)


@pytest.mark.parametrize(
    "mode, active",
    [("dual", {"global", "tile", "token"}), ("global_only", {"global"}), ("local_only", {"tile", "token"})],
)
def test_modes_switch_terms(mode, active):
    w = losses.LossWeights.from_config(_loss_cfg(mode=mode))
    pred = losses.Predictions(jnp.ones((2, 3)), jnp.ones((2, 16, 3)), jnp.ones((2, 4, 4, 5)))
    t = losses.Targets(jnp.ones((2, 3)), jnp.ones((2, 16, 3)), -jnp.ones((2, 4, 4, 5)))
    terms = losses.xmag_losses(pred, t, w)
    assert set(terms) == active | {"total"} == set(w.term_names)
    np.testing.assert_allclose(terms["total"], 2.0 * ("token" in active), atol=1e-6)


def test_bad_loss_config_is_rejected():
    with pytest.raises(ValueError, match="config.loss.mode"):
        losses.LossWeights.from_config(_loss_cfg(mode="both"))
    with pytest.raises(ValueError, match="weight 0"):
        losses.LossWeights.from_config(_loss_cfg(mode="global_only", global_weight=0.0))
    with pytest.raises(ValueError, match=">= 0"):
        losses.LossWeights.from_config(_loss_cfg(tile_weight=-1.0))


def test_grids_that_do_not_divide_raise():
    with pytest.raises(ValueError, match="blocks"):
        losses.student_tile_blocks(jnp.zeros((1, 6, 6, 2)))
    with pytest.raises(ValueError, match="student grid"):
        losses.pool_to_grid(jnp.zeros((1, 12, 12, 2)), 5)


def test_centering_removes_the_component_all_targets_share():
    """Two fields whose tiles differ only by a small ±x on top of a large shared y: uncentred, a constant
    prediction along y scores a near-zero cosine loss; centred, the same constant scores 1 (orthogonal)."""
    shared = jnp.array([0.0, 10.0])
    offset = jnp.array([1.0, 0.0])
    emb = jnp.stack([jnp.tile(shared + offset, (16, 1)), jnp.tile(shared - offset, (16, 1))])
    tokens = jnp.ones((2, 16, 2, 2, 3)) * jnp.array([1.0, 2.0, 3.0])
    t = losses.teacher_targets(emb, tokens, student_grid=4)
    means = losses.target_means(t)
    np.testing.assert_allclose(means["embedding"], shared)
    np.testing.assert_allclose(means["token"], [1.0, 2.0, 3.0])
    centred = losses.center_targets(t, means)
    np.testing.assert_allclose(centred.global_, [[1.0, 0.0], [-1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(centred.tiles[:, 3], [[1.0, 0.0], [-1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(centred.tokens, 0.0, atol=1e-6)
    constant = jnp.tile(shared, (2, 1))
    assert losses.cosine_distance(constant, t.global_) < 0.01
    np.testing.assert_allclose(losses.cosine_distance(constant, centred.global_), 1.0, atol=1e-6)

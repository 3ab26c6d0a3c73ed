"""Batch augmentation: shape/range, determinism for resume, identities and flips."""

from __future__ import annotations

import pytest
import torch

from shared.spec import Augment
from workers.training.augment import (
    affine_matrices,
    augment_batch,
    lighting,
    sample_grid,
    warp_homographies,
)

NOTHING = Augment(flip=False, max_rotate=0, max_zoom=1.0, max_lighting=0, max_warp=0)
FLIP_ONLY = Augment(flip=True, max_rotate=0, max_zoom=1.0, max_lighting=0, max_warp=0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    x = torch.rand(n, 3, h, w, generator=gen(seed))
    x[0, 0, 0, 0] = 0.0  # exact extremes must survive untouched paths too
    x[0, 0, 0, 1] = 1.0
    return x


def test_default_augment_keeps_shape_dtype_and_range():
    x = images(8, 16, 24)
    out = augment_batch(x, Augment(), gen(1))
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0
    assert not torch.equal(out, x)
    assert torch.isfinite(out).all()


def test_strong_augment_stays_in_range():
    params = Augment(max_rotate=45, max_zoom=2.0, max_lighting=0.9, max_warp=0.9, flip_vert=True)
    out = augment_batch(images(16), params, gen(2))
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0


def test_same_seed_same_output():
    x = images(8)
    first = augment_batch(x.clone(), Augment(), gen(123))
    second = augment_batch(x.clone(), Augment(), gen(123))
    other = augment_batch(x.clone(), Augment(), gen(124))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_generator_state_advances_identically():
    """A resumed epoch re-creates the generator: the next draws must line up too."""
    g1, g2 = gen(5), gen(5)
    augment_batch(images(4), Augment(), g1)
    augment_batch(images(4, seed=9), Augment(), g2)  # different pixels, same draws
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_nothing_enabled_is_the_identity():
    x = images(8)
    out = augment_batch(x, NOTHING, gen(0))
    assert torch.equal(out, x)


def test_flip_only_flips_about_half_and_nothing_else():
    x = images(200, 8, 8)
    out = augment_batch(x, FLIP_ONLY, gen(7))
    mirrored = x.flip(3)
    flipped = 0
    for i in range(200):
        if torch.equal(out[i], mirrored[i]):
            flipped += 1
        else:
            assert torch.equal(out[i], x[i]), i
    assert 70 <= flipped <= 130


def test_flip_vert_only_flips_rows():
    params = FLIP_ONLY.model_copy(update={"flip": False, "flip_vert": True})
    x = images(40, 8, 12)  # not square: plain vertical flips, no dihedral
    out = augment_batch(x, params, gen(3))
    flipped = sum(bool(torch.equal(out[i], x[i].flip(1))) for i in range(40))
    kept = sum(bool(torch.equal(out[i], x[i])) for i in range(40))
    assert flipped + kept == 40
    assert 0 < flipped < 40


def test_dihedral_on_square_images_is_one_of_eight_symmetries():
    params = FLIP_ONLY.model_copy(update={"flip_vert": True})
    x = images(64, 8, 8)
    out = augment_batch(x, params, gen(4))
    used = set()
    for i in range(64):
        item = x[i]
        candidates = []
        for k in range(8):
            c = item
            if k & 1:
                c = c.flip(2)
            if k & 2:
                c = c.flip(1)
            if k & 4:
                c = c.transpose(1, 2)
            candidates.append(c)
        matches = [k for k, c in enumerate(candidates) if torch.equal(out[i], c)]
        assert matches, i
        used.add(matches[0])
    assert len(used) == 8


def test_identity_homography_without_warp():
    h = warp_homographies(5, NOTHING, gen(0))
    assert h.shape == (5, 3, 3)
    torch.testing.assert_close(h, torch.eye(3).expand(5, 3, 3), rtol=0, atol=1e-6)


def test_warp_homography_moves_corners_within_max_warp():
    params = Augment(max_warp=0.4, p_affine=1.0)
    h = warp_homographies(3, params, gen(8))
    assert not torch.allclose(h, torch.eye(3).expand(3, 3, 3))
    # Each corner keeps its quadrant and moves by at most max_warp along each axis.
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    mapped = corners @ h.transpose(1, 2)
    xy = mapped[..., :2] / mapped[..., 2:]
    assert torch.equal(torch.sign(xy), corners[:, :2].expand(3, 4, 2))
    assert float((xy.abs() - 1).abs().max()) <= 0.4 + 1e-5
    assert float((xy.abs() - 1).abs().max()) > 0


def test_identity_affine_without_rotate_or_zoom():
    m = affine_matrices(6, NOTHING, gen(1))
    torch.testing.assert_close(m, torch.eye(3).expand(6, 3, 3), rtol=0, atol=0)


def test_rotation_matrix_is_orthonormal_without_zoom():
    params = Augment(max_rotate=30, max_zoom=1.0, p_affine=1.0)
    m = affine_matrices(10, params, gen(2))
    rot = m[:, :2, :2]
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(2).expand(10, 2, 2))
    angles = torch.rad2deg(torch.atan2(m[:, 1, 0], m[:, 0, 0]))
    assert float(angles.abs().max()) <= 30.0 + 1e-4
    assert float(angles.abs().max()) > 0


def test_identity_grid_is_the_pixel_grid():
    grid = sample_grid(torch.eye(3).expand(2, 3, 3), 4, 5)
    assert grid.shape == (2, 4, 5, 2)
    torch.testing.assert_close(grid[0, 0, :, 0], torch.linspace(-1, 1, 5))
    torch.testing.assert_close(grid[0, :, 0, 1], torch.linspace(-1, 1, 4))


def test_lighting_skips_items_whose_coins_are_tails():
    params = Augment(max_lighting=0.5, p_lighting=0.5)
    x = images(64, 4, 4)
    out = lighting(x, params, gen(11))
    unchanged = sum(bool(torch.equal(out[i], x[i])) for i in range(64))
    # Both coins tails with probability 1/4: about 16 items keep their exact pixels.
    assert 4 <= unchanged <= 32
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0


@pytest.mark.parametrize("p_lighting", [0.0, 1.0])
def test_lighting_off_is_exact(p_lighting):
    x = images(8, 4, 4)
    params = Augment(max_lighting=0.0 if p_lighting else 0.3, p_lighting=p_lighting)
    assert torch.equal(lighting(x, params, gen(0)), x)


def test_lighting_brightness_moves_the_mean():
    params = Augment(max_lighting=0.8, p_lighting=1.0)
    x = torch.full((200, 3, 2, 2), 0.5)
    out = lighting(x, params, gen(3))
    means = out.mean(dim=(1, 2, 3))
    assert float(means.min()) < 0.45
    assert float(means.max()) > 0.55

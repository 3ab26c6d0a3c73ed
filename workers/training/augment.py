"""fastai's default train-time augmentations, applied to a whole batch at once.

``get_transforms()`` (reference §1): each item flips its own coins — flip
(p 0.5), symmetric perspective warp (p_affine), rotate and zoom (p_affine,
composed into one matrix), brightness and contrast in logit space
(p_lighting).  Warp, rotate and zoom become a single bilinear ``grid_sample``
with reflection padding and ``align_corners=True``, as in fastai.  Doing it per
batch on the training device instead of per item in Python is what keeps the
engine as fast as a hand-written loop.  The random draws come from a
``torch.Generator`` the caller seeds per epoch, so a resumed epoch sees the
same augmentations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from shared.spec import Augment

_EPS = 1e-6


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _coin(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def affine_matrices(n: int, params: Augment, gen: torch.Generator) -> torch.Tensor:
    """Per-item 3x3 matrices mapping output coords to input coords (rotate, then zoom)."""
    rotate = _coin(n, params.p_affine, gen) & (params.max_rotate > 0)
    degrees = _uniform(n, -params.max_rotate, params.max_rotate, gen) * rotate
    theta = degrees * math.pi / 180
    cos, sin = torch.cos(theta), torch.sin(theta)
    zoom_on = _coin(n, params.p_affine, gen) & (params.max_zoom > 1)
    scale = torch.where(zoom_on, _uniform(n, 1.0, params.max_zoom, gen), torch.ones(n))
    row_c = _uniform(n, 0, 1, gen) * 2 - 1
    col_c = _uniform(n, 0, 1, gen) * 2 - 1
    matrices = torch.zeros(n, 3, 3)
    matrices[:, 0, 0] = cos / scale
    matrices[:, 0, 1] = -sin / scale
    matrices[:, 1, 0] = sin / scale
    matrices[:, 1, 1] = cos / scale
    # Zoom towards a random focus point, as fastai's zoom(row_pct, col_pct).
    matrices[:, 0, 2] = col_c * (1 - 1 / scale)
    matrices[:, 1, 2] = row_c * (1 - 1 / scale)
    matrices[:, 2, 2] = 1
    return matrices


def warp_homographies(n: int, params: Augment, gen: torch.Generator) -> torch.Tensor:
    """Per-item symmetric perspective warps (3x3), identity for items that skip it.

    Like fastai's ``symmetric_warp``: four magnitudes ~ U(-max_warp, max_warp)
    stretch the left and right edges vertically and the top and bottom edges
    horizontally, each symmetrically about its middle, which tilts the image.
    """
    on = _coin(n, params.p_affine, gen) & (params.max_warp > 0)
    mags = _uniform(4 * n, -params.max_warp, params.max_warp, gen).view(n, 4) * on[:, None]
    src = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
    m0, m1, m2, m3 = mags.unbind(1)
    dst = torch.stack(
        [
            torch.stack([-1 - m3, -1 - m1], 1),  # top left
            torch.stack([-1 - m2, 1 + m1], 1),  # bottom left
            torch.stack([1 + m3, -1 - m0], 1),  # top right
            torch.stack([1 + m2, 1 + m0], 1),  # bottom right
        ],
        1,
    )
    return _homographies(src.expand(n, 4, 2), dst)


def _homographies(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Solve the 8-parameter homography mapping each src quad to its dst quad."""
    n = src.shape[0]
    rows = []
    targets = []
    for k in range(4):
        x, y = src[:, k, 0], src[:, k, 1]
        u, v = dst[:, k, 0], dst[:, k, 1]
        zeros, ones = torch.zeros(n), torch.ones(n)
        rows.append(torch.stack([x, y, ones, zeros, zeros, zeros, -u * x, -u * y], 1))
        rows.append(torch.stack([zeros, zeros, zeros, x, y, ones, -v * x, -v * y], 1))
        targets.extend([u, v])
    a = torch.stack(rows, 1)
    b = torch.stack(targets, 1)
    h = torch.linalg.solve(a, b)
    return torch.cat([h, torch.ones(n, 1)], 1).view(n, 3, 3)


def sample_grid(matrices: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Apply per-item 3x3 projective maps to the normalized output grid.

    Computed where ``matrices`` live: for a batch on the GPU the grid (N x H x
    W x 2 floats, ~100 MB at 256 x 224 px) is made there, not on the host and
    copied over (that made a fast GPU wait for its input).
    """
    n = matrices.shape[0]
    ys = torch.linspace(-1, 1, height, device=matrices.device, dtype=matrices.dtype)
    xs = torch.linspace(-1, 1, width, device=matrices.device, dtype=matrices.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    coords = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], -1).view(1, -1, 3)
    mapped = coords.expand(n, -1, -1) @ matrices.transpose(1, 2)
    xy = mapped[..., :2] / mapped[..., 2:].clamp_min(_EPS)
    return xy.view(n, height, width, 2)


def lighting(x: torch.Tensor, params: Augment, gen: torch.Generator) -> torch.Tensor:
    """Brightness then contrast in logit space, each with its own coin (fastai)."""
    n = x.shape[0]
    bright = _coin(n, params.p_lighting, gen) & (params.max_lighting > 0)
    contrast = _coin(n, params.p_lighting, gen) & (params.max_lighting > 0)
    half = params.max_lighting / 2
    change = _uniform(n, 0.5 - half, 0.5 + half, gen)
    low = max(1 - params.max_lighting, _EPS)
    scale = torch.exp(_uniform(n, math.log(low), math.log(1 / low), gen))
    if not bool(bright.any() or contrast.any()):
        return x
    shift = torch.where(bright, torch.logit(change), torch.zeros(n)).to(x.device)
    mult = torch.where(contrast, scale, torch.ones(n)).to(x.device)
    logits = torch.logit(x.clamp(_EPS, 1 - _EPS))
    logits = (logits + shift.view(n, 1, 1, 1)) * mult.view(n, 1, 1, 1)
    # Items whose coins both came up tails keep their exact pixels.
    on = (bright | contrast).to(x.device).view(n, 1, 1, 1)
    return torch.where(on, torch.sigmoid(logits), x)


def augment_batch(x: torch.Tensor, params: Augment, gen: torch.Generator) -> torch.Tensor:
    """Augment a float batch in [0, 1] (N, 3, H, W) on whatever device it lives on.

    Random numbers are drawn on the CPU from ``gen`` so results do not depend on
    the device; only the pixel work runs on the batch's device.
    """
    n, _, height, width = x.shape
    matrices = affine_matrices(n, params, gen) @ warp_homographies(n, params, gen)
    identity = torch.eye(3).expand(n, 3, 3)
    if not torch.allclose(matrices, identity):
        grid = sample_grid(matrices.to(x.device), height, width).to(x.dtype)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    x = lighting(x, params, gen)
    if params.flip_vert and height == width:
        # Dihedral: one of the 8 symmetries of the square, chosen uniformly.
        choice = torch.randint(0, 8, (n,), generator=gen)
        out = x.clone()
        for k in range(8):
            mask = (choice == k).to(x.device)
            if not bool(mask.any()):
                continue
            item = x[mask]
            if k & 1:
                item = item.flip(3)
            if k & 2:
                item = item.flip(2)
            if k & 4:
                item = item.transpose(2, 3)
            out[mask] = item
        return out
    if params.flip or params.flip_vert:
        flips = _coin(n, 0.5, gen).to(x.device)
        dim = 2 if params.flip_vert and not params.flip else 3
        x = torch.where(flips.view(n, 1, 1, 1), x.flip(dim), x)
    return x

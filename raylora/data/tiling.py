"""InternVL dynamic tiling: choose a grid of square tiles matching the image's aspect ratio.

Tiles leave the pipeline as uint8 (N, 3, S, S) arrays; normalisation (ImageNet mean/std) happens on
the training device with :func:`normalize`, because float32 tiles would be 4x the bytes to ship.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

# torch is imported inside normalize(), the one function that runs on the training device.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@lru_cache(maxsize=64)
def candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) with min_num <= cols*rows <= max_num, ordered by tile count."""
    grids = [
        (cols, rows)
        for cols in range(1, max_num + 1)
        for rows in range(1, max_num + 1)
        if min_num <= cols * rows <= max_num
    ]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def choose_grid(
    width: int, height: int, image_size: int = 448, min_num: int = 1, max_num: int = 6
) -> tuple[int, int]:
    """The (cols, rows) grid whose ratio is closest to width/height.

    On an exact tie the later (larger) candidate wins only while the image's area exceeds half the
    area the larger grid covers, as in InternVL's ``find_closest_aspect_ratio``.
    """
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(
    width: int,
    height: int,
    image_size: int = 448,
    min_num: int = 1,
    max_num: int = 6,
    use_thumbnail: bool = True,
) -> int:
    cols, rows = choose_grid(width, height, image_size, min_num, max_num)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n


def tile_image(
    image: Image.Image,
    image_size: int = 448,
    min_num: int = 1,
    max_num: int = 6,
    use_thumbnail: bool = True,
) -> np.ndarray:
    """Dynamic tiling of an RGB image -> uint8 array (tiles, 3, image_size, image_size).

    The image is resized (bicubic) to the chosen grid and cut row by row; with more than one tile
    and ``use_thumbnail``, the whole image resized to one tile is appended last.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    cols, rows = choose_grid(width, height, image_size, min_num, max_num)
    resized = np.asarray(image.resize((image_size * cols, image_size * rows), Image.BICUBIC))
    tiles = [
        resized[r * image_size : (r + 1) * image_size, c * image_size : (c + 1) * image_size]
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(np.asarray(image.resize((image_size, image_size), Image.BICUBIC)))
    return np.ascontiguousarray(np.stack(tiles).transpose(0, 3, 1, 2))


def normalize(tiles, dtype=None):
    """uint8 tiles (N, 3, S, S) as a torch tensor -> ImageNet-normalised floats, on the tiles' device."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=tiles.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=tiles.device).view(1, 3, 1, 1)
    out = (tiles.float() / 255.0 - mean) / std
    return out.to(dtype) if dtype is not None else out

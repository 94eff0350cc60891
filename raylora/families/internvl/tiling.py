"""InternVL dynamic tiling: choose a grid of square tiles matching the image's aspect ratio.

Tiles leave the pipeline as uint8 (N, 3, S, S) arrays; normalisation (ImageNet mean/std) happens on
the training device with :func:`normalize`, because float32 tiles would be 4x the bytes to ship.

The resize is PIL's bicubic (what InternVL's checkpoints were trained on), split across two
libraries for speed: see :func:`resize_bicubic`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from PIL import Image

# torch is imported inside the functions that use it: choosing grids and counting tiles (the data
# checks) do not need it.

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
    and ``use_thumbnail``, the whole image resized to one tile is appended last. Pixels are within
    one grey level of InternVL's PIL ``resize`` + ``crop`` (:func:`resize_bicubic`).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    cols, rows = choose_grid(width, height, image_size, min_num, max_num)
    n = cols * rows
    thumbnail = use_thumbnail and n > 1
    s = image_size
    out = np.empty((n + thumbnail, 3, s, s), dtype=np.uint8)
    grid = resize_bicubic(image, s * cols, s * rows)
    # every tile in one copy that also moves channels first: tile r*cols + c is grid[r*s:, c*s:][:s, :s]
    out[:n].reshape(rows, cols, 3, s, s)[...] = grid.reshape(rows, s, cols, s, 3).transpose(0, 2, 4, 1, 3)
    if thumbnail:
        out[n] = resize_bicubic(image, s, s).transpose(2, 0, 1)
    return out


def resize_bicubic(image: Image.Image, width: int, height: int) -> np.ndarray:
    """``np.asarray(image.resize((width, height), Image.BICUBIC))`` of an RGB image, uint8
    (height, width, 3), within one grey level of PIL's pixels, faster. Read it, do not write to it.

    PIL resizes in two one-dimensional passes and rounds to uint8 in between. The first pass runs in
    PIL, so the intermediate image is exactly PIL's; the second runs in torch's uint8 antialiased
    bicubic kernel (PIL's filter and support, vectorised, weights of less precision), whose rounding
    can differ from PIL's by one. Doing both passes in torch (as transformers' torchvision image
    processor does) is faster but not as close: an intermediate off by one can end two grey levels
    off, and torch always runs the horizontal pass first where recent Pillow may not.
    """
    import torch

    w, h = image.size
    order = _pil_pass_order()
    if order is None:  # a Pillow whose pass order is not known here: all in PIL
        return np.asarray(image.resize((width, height), Image.BICUBIC))
    if w != width and h != height:
        image = image.resize((width, h) if order(w, h, width, height) else (w, height), Image.BICUBIC)
    pixels = np.asarray(image)  # read-only; torch only reads it
    if pixels.shape[:2] == (height, width):
        return pixels
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        # (1, 3, h, w) channels-last, the batch dimension added before the permute: torch's
        # vectorised uint8 resize takes 4x longer on the strides of permute(2, 0, 1)[None]
        x = torch.from_numpy(pixels)[None].permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", antialias=True)
    return x[0].permute(1, 2, 0).numpy()


def _horizontal_first_always(w: int, h: int, width: int, height: int) -> bool:
    return True


def _horizontal_first_unless_tall(w: int, h: int, width: int, height: int) -> bool:
    """Pillow >= 13: the vertical pass first when the height shrinks by more than twice the width."""
    return not (h - height > 0 and h - height > (w - width) * 2)


@lru_cache(maxsize=1)
def _pil_pass_order() -> Callable[[int, int, int, int], bool] | None:
    """Which of PIL's two resize passes this Pillow runs first, as ``f(w, h, width, height) -> True
    when horizontal``, found by resizing a small noise image; None if neither known rule matches."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 16, 3), dtype=np.uint8)
    image = Image.fromarray(noise)  # 16 x 64 to 12 x 16: the orders give different pixels
    got = np.asarray(image.resize((12, 16), Image.BICUBIC))
    h_first = np.asarray(image.resize((12, 64), Image.BICUBIC).resize((12, 16), Image.BICUBIC))
    v_first = np.asarray(image.resize((16, 16), Image.BICUBIC).resize((12, 16), Image.BICUBIC))
    if np.array_equal(h_first, v_first):
        return None
    if np.array_equal(got, h_first):
        return _horizontal_first_always
    if np.array_equal(got, v_first):
        return _horizontal_first_unless_tall
    return None


def normalize(tiles, dtype=None):
    """uint8 tiles (N, 3, S, S) as a torch tensor -> ImageNet-normalised floats, on the tiles' device."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=tiles.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=tiles.device).view(1, 3, 1, 1)
    out = (tiles.float() / 255.0 - mean) / std
    return out.to(dtype) if dtype is not None else out

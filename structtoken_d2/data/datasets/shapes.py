"""Synthetic ``shapes_sem_seg_{train,val}``: a few shapes per image whose class is their SHAPE.

Colours and textures of the shapes and of the background are random and independent of the
class, so only geometry tells the classes apart; shapes stand nearly upright (tilted by at most
``_MAX_TILT``), at random positions and sizes. Each shape's outline is a thin ignore (255)
band and some images have a rectangular ignore patch. The data are generated deterministically
(numpy + cv2, seconds) on first use under ``$DETECTRON2_DATASETS/shapes_sem_seg``: written to a
temporary directory and renamed into place, so an interrupted or concurrent generation never
leaves a partial dataset behind.
"""
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import cv2
import numpy as np

from .registration import IGNORE_LABEL, datasets_root, register_sem_seg_dataset

SHAPES_CLASSES = ["background", "circle", "square", "triangle", "star", "cross"]
SHAPES_COLORS = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48)]
#: Images per split, side length of the square images, and the seed of each split.
SHAPES_SPLITS = {"train": (2000, 0), "val": (200, 1)}
SHAPES_IMAGE_SIZE = 128
_VERSION = "v5"  # bump when the generator or its files change, so old copies are regenerated (v5: uncompressed images)
_OUTLINE_PX = 2


def _regular_polygon(radii: List[float]) -> Callable[[np.ndarray, float], np.ndarray]:
    """Polygon whose vertices alternate through ``radii`` (relative to r) around the circle."""

    def vertices(center: np.ndarray, r: float, angle: float) -> np.ndarray:
        t = angle + np.arange(len(radii)) * 2 * np.pi / len(radii)
        rr = r * np.asarray(radii)
        return center + np.stack([rr * np.cos(t), rr * np.sin(t)], axis=1)

    return vertices


def _cross(center: np.ndarray, r: float, angle: float) -> np.ndarray:
    a = 0.38  # half arm width relative to r
    pts = np.array([(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1),
                    (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)], dtype=np.float64) * r
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return center + pts @ rot.T


#: Shapes stand upright (square and cross axis-aligned, triangle and star pointing up), turned by
#: at most this many radians either way: the classes differ in geometry, not in orientation, and a
#: ViT trained from scratch on a CPU learns them in minutes (with free rotation, squares, crosses
#: and stars share too many local patches to be told apart in the main job's budget).
_MAX_TILT = 0.2
#: Class index -> angle (radians) of the upright pose of its vertices (image y axis points down).
_UPRIGHT_ANGLE = {2: np.pi / 4, 3: -np.pi / 2, 4: -np.pi / 2, 5: 0.0}

#: Class index -> vertices(center [2], radius, angle) -> [P, 2] (x, y); None draws a circle.
_SHAPE_VERTICES = {
    1: None,
    2: _regular_polygon([1.0] * 4),
    3: _regular_polygon([1.0] * 3),
    4: _regular_polygon([1.0, 0.45] * 5),
    5: _cross,
}


def _texture(rng: np.random.Generator, size: int, avoid: Optional[np.ndarray] = None):
    """([size, size, 3] float texture, its base colour [3]): a random base colour (at least 100
    away from ``avoid``, so that shapes stand out from the background), flat or overlaid with a
    faint random pattern (stripes, checkerboard or smooth noise) of a second colour."""
    for _attempt in range(20):
        base = rng.uniform(0, 255, 3)
        if avoid is None or np.linalg.norm(base - avoid) > 100:
            break
    other = rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:  # flat
        pattern = np.zeros((size, size), np.float32)
    elif kind == 1:  # stripes
        theta, freq = rng.uniform(0, np.pi), rng.uniform(0.15, 0.6)
        pattern = 0.5 + 0.5 * np.sin(freq * (xx * np.cos(theta) + yy * np.sin(theta)))
    elif kind == 2:  # checkerboard
        cell = int(rng.integers(3, 10))
        pattern = ((xx // cell + yy // cell) % 2).astype(np.float32)
    else:  # smooth noise
        pattern = cv2.resize(rng.uniform(0, 1, (8, 8)).astype(np.float32), (size, size))
    weight = 0.3 * pattern[..., None]
    return base * (1 - weight) + other * weight, base


def render_shapes_sample(rng: np.random.Generator, size: int = SHAPES_IMAGE_SIZE):
    """One sample: ([size, size, 3] uint8 BGR image, [size, size] uint8 label)."""
    image, background = _texture(rng, size)
    label = np.zeros((size, size), np.uint8)
    outline = np.zeros((size, size), np.uint8)
    placed = []  # (center, radius) of the shapes drawn so far
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(1, len(SHAPES_CLASSES)))
        r = rng.uniform(0.2, 0.36) * size
        for _attempt in range(10):  # prefer a spot where the shape is not mostly hidden
            center = rng.uniform(0.15 * size, 0.85 * size, 2)
            if all(np.linalg.norm(center - c) > 0.8 * (r + rc) for c, rc in placed):
                break
        placed.append((center, r))
        mask = np.zeros((size, size), np.uint8)
        if _SHAPE_VERTICES[cls] is None:
            c = tuple(int(v) for v in center)
            cv2.circle(mask, c, int(r), 1, -1, cv2.LINE_8)
            cv2.circle(outline, c, int(r), 1, _OUTLINE_PX, cv2.LINE_8)
        else:
            angle = _UPRIGHT_ANGLE[cls] + rng.uniform(-_MAX_TILT, _MAX_TILT)
            pts = np.round(_SHAPE_VERTICES[cls](center, r, angle)).astype(np.int32)
            cv2.fillPoly(mask, [pts], 1)
            cv2.polylines(outline, [pts], True, 1, _OUTLINE_PX)
        inside = mask.astype(bool)
        image[inside] = _texture(rng, size, avoid=background)[0][inside]
        label[inside] = cls
    label[outline.astype(bool)] = IGNORE_LABEL
    if rng.uniform() < 0.3:
        y0, x0 = rng.integers(0, size - 16, 2)
        h, w = rng.integers(8, 24, 2)
        label[y0 : y0 + h, x0 : x0 + w] = IGNORE_LABEL
    noisy = image + rng.normal(0, 6, image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), label


def _generate_split(directory: Path, count: int, seed: int) -> None:
    (directory / "images").mkdir(parents=True)
    (directory / "labels").mkdir()
    # Uncompressed PNG (the same pixels): decoding the noisy 128 px images took a third of the
    # training mapper's time at compression level 1 (0.50 ms), 0.16 ms uncompressed (docs/speed.md).
    for i in range(count):
        image, label = render_shapes_sample(np.random.default_rng([seed, i]))
        cv2.imwrite(str(directory / "images" / f"{i:05d}.png"), image, [cv2.IMWRITE_PNG_COMPRESSION, 0])
        cv2.imwrite(str(directory / "labels" / f"{i:05d}.png"), label, [cv2.IMWRITE_PNG_COMPRESSION, 1])


def shapes_root() -> Path:
    return datasets_root() / "shapes_sem_seg" / _VERSION


def ensure_shapes_generated() -> Path:
    """Generate the dataset if it is not there yet and return its root directory."""
    root = shapes_root()
    if root.is_dir():
        return root
    logging.getLogger(__name__).info("Generating the synthetic shapes dataset under %s ...", root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_VERSION}-tmp-", dir=root.parent))
    try:
        for split, (count, seed) in SHAPES_SPLITS.items():
            _generate_split(tmp / split, count, seed)
        os.rename(tmp, root)
    except OSError:
        if not root.is_dir():  # a concurrent generator did not win the race either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _load_split(split: str) -> List[Dict]:
    directory = ensure_shapes_generated() / split
    count = SHAPES_SPLITS[split][0]
    return [
        {
            "file_name": str(directory / "images" / f"{i:05d}.png"),
            "sem_seg_file_name": str(directory / "labels" / f"{i:05d}.png"),
            "height": SHAPES_IMAGE_SIZE,
            "width": SHAPES_IMAGE_SIZE,
            "image_id": i,
        }
        for i in range(count)
    ]


def register_shapes() -> None:
    """Register ``shapes_sem_seg_train`` and ``shapes_sem_seg_val``."""
    for split in SHAPES_SPLITS:
        register_sem_seg_dataset(
            f"shapes_sem_seg_{split}",
            lambda split=split: _load_split(split),
            dict(stuff_classes=SHAPES_CLASSES, stuff_colors=SHAPES_COLORS),
        )

"""Check an image of the shapes world directly, without a learned judge: background, object color, shape,
position and size are read off the pixels of a one-object 128 x 128 image.

Background: median of the border pixels. Object: pixels far from the background seed a first mask whose eroded
interior gives the object color; the final mask is the pixels past halfway from the background color to the object
color (3 x 3 smoothed; the half-intensity edge, so blur does not change the area), largest 4-connected component,
holes filled. Color: median of the final mask's eroded interior. Shape, from the mask's geometry: a square fills
its minimum-area enclosing rectangle (~1.0; circle ~0.785, triangle ~0.5, star ~0.4); the upright triangle is
bottom-heavy (centroid at 2/3 of its height) and convex while its hull fills only half its rectangle; the star is
far from convex (solidity = area / convex hull area ~0.6, up to ~0.85 blurred); the rest is a circle. Position: the
nearest of world.POSITIONS to the bounding-box center (every shape is drawn centered on its box). Size: the
half-extent sqrt(area / k) for the detected shape's area constant k, nearest of world.SIZES on a log scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from training.shapes import world

ATTRIBUTES = ("background", "color", "shape", "position", "size")  # what score() checks
SEED_DISTANCE = 40.0  # RGB distance from the background that surely belongs to an object
MIN_AREA = 40  # pixels; fewer is "no object found" (the smallest object, a small star, has ~170)
# shape thresholds, midway between the ranges measured on jittered renders blurred by 0-2 px plus noise (ranges at
# 1.5 px; then at 2 px where the classes come closer)
SQUARE_FILL = 0.885  # area / min-area rectangle: square >= 0.94 (0.90), circle <= 0.84, triangle and star <= 0.68
TRIANGLE_SCORE = 0.64  # cy_rel + (solidity - hull_fill) / 2: triangle >= 0.71 (0.67), star and circle <= 0.60 (0.62)
STAR_SOLIDITY = 0.91  # area / convex hull area: star <= 0.85 (0.90), circle >= 0.93
SHAPE_AREA = {  # area of each shape in units of its half-extent squared, as world.shape_polygon draws it
    "circle": math.pi, "square": 4.0, "triangle": 4 / math.sqrt(3),
    "star": 5 * 1.1 * (1.1 * 0.45) * math.sin(math.pi / 5),
}


@dataclass(frozen=True)
class Detection:
    """What an image shows: color names from world.COLORS, a shape of world.SHAPES, names of world.POSITIONS and
    world.SIZES; `found` False (and the object fields None) when no object stands out from the background."""
    background: str
    found: bool
    color: str | None = None
    shape: str | None = None
    position: str | None = None
    size: str | None = None
    area: int = 0  # object mask pixel count
    solidity: float = 0.0  # area / convex hull area
    rect_fill: float = 0.0  # area / minimum-area enclosing rectangle
    hull_fill: float = 0.0  # convex hull area / that rectangle
    cy_rel: float = 0.0  # centroid height within the bounding box, 0 top, 1 bottom
    center: tuple[float, float] = (0.0, 0.0)  # bounding-box center (x, y)
    half_extent: float = 0.0


_NAMES = list(world.COLORS)
_RGB = np.array([world.COLORS[n] for n in _NAMES], dtype=np.float64)


def nearest_color(rgb: np.ndarray) -> str:
    """The world.COLORS name nearest to an RGB triple."""
    return _NAMES[int(np.argmin(((_RGB - np.asarray(rgb, dtype=np.float64)) ** 2).sum(axis=1)))]


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True pixels: (row, start, end) arrays, end exclusive."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)  # same row-major order as the starts
    return rows, starts, ends


def label_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """4-connected components of a boolean mask, by union-find over horizontal runs: (row, start, end, component)."""
    rows, starts, ends = _runs(mask)
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows, np.arange(mask.shape[0] + 1))
    for r in range(mask.shape[0] - 1):
        a, a_end = int(row_first[r]), int(row_first[r + 1])
        b, b_end = a_end, int(row_first[r + 2])
        while a < a_end and b < b_end:  # two runs overlap in columns -> one component
            if starts[a] < ends[b] and starts[b] < ends[a]:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if ends[a] < ends[b]:
                a += 1
            else:
                b += 1
    comp = np.array([find(i) for i in range(len(rows))], dtype=np.int64)
    return rows, starts, ends, comp


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask, with its holes filled."""
    rows, starts, ends, comp = label_runs(mask)
    out = np.zeros_like(mask, dtype=bool)
    if len(rows) == 0:
        return out
    sizes = np.bincount(comp, weights=ends - starts)
    keep = comp == int(np.argmax(sizes))
    for r, s, e in zip(rows[keep], starts[keep], ends[keep]):
        out[r, s:e] = True
    # holes: background components that do not touch the border
    rows, starts, ends, comp = label_runs(~out)
    h, w = mask.shape
    border = np.unique(comp[(rows == 0) | (rows == h - 1) | (starts == 0) | (ends == w)])
    hole = ~np.isin(comp, border)
    for r, s, e in zip(rows[hole], starts[hole], ends[hole]):
        out[r, s:e] = True
    return out


def box3(a: np.ndarray) -> np.ndarray:
    """3 x 3 mean filter (edge values repeated): takes pixel noise off the edge of the mask."""
    p = np.pad(a, 1, mode="edge")
    h, w = a.shape
    return sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """Binary erosion with the 4-neighbourhood, `steps` times (pixels outside the image count as False)."""
    m = mask.copy()
    for _ in range(steps):
        p = np.pad(m, 1)
        m = m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m


def dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """Binary dilation with the 4-neighbourhood, `steps` times (pixels outside the image count as False)."""
    m = mask.copy()
    for _ in range(steps):
        p = np.pad(m, 1)
        m = m | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return m


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull of 2D points, counter-clockwise (monotone chain), as an (h, 2) array."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return np.array(pts, dtype=np.float64)

    def cross(o, a, b) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def min_rect_area(hull: np.ndarray) -> float:
    """Area of the smallest enclosing rectangle of a convex polygon (one side lies along a hull edge)."""
    edges = np.roll(hull, -1, axis=0) - hull
    u = edges / np.linalg.norm(edges, axis=1, keepdims=True)
    v = np.stack([-u[:, 1], u[:, 0]], axis=1)
    pu, pv = hull @ u.T, hull @ v.T  # (points, edges)
    return float(((pu.max(0) - pu.min(0)) * (pv.max(0) - pv.min(0))).min())


def _outline_corners(mask: np.ndarray) -> np.ndarray:
    """Corners of the leftmost and rightmost pixel squares of each row: their hull is the pixels' hull."""
    rows = np.nonzero(mask.any(axis=1))[0]
    left = mask[rows].argmax(axis=1)
    right = mask.shape[1] - mask[rows, ::-1].argmax(axis=1)
    y = np.concatenate([rows, rows + 1, rows, rows + 1])
    x = np.concatenate([left, left, right, right])
    return np.stack([x, y], axis=1)


def classify_shape(solidity: float, rect_fill: float, hull_fill: float, cy_rel: float) -> str:
    """Shape from geometry: square fills its enclosing rectangle; the upright triangle is bottom-heavy, convex and
    fills half its rectangle even as a hull; the star is far from convex; what is left is the circle."""
    if rect_fill >= SQUARE_FILL:
        return "square"
    if cy_rel + (solidity - hull_fill) / 2 >= TRIANGLE_SCORE:
        return "triangle"
    if solidity < STAR_SOLIDITY:
        return "star"
    return "circle"


def nearest_position(x: float, y: float) -> str:
    return min(world.POSITIONS, key=lambda p: (world.POSITIONS[p][0] - x) ** 2 + (world.POSITIONS[p][1] - y) ** 2)


def nearest_size(half_extent: float) -> str:
    return min(world.SIZES, key=lambda s: abs(math.log(max(half_extent, 1e-6) / world.SIZES[s])))


def analyze(image: np.ndarray) -> Detection:
    """Read background, object color, shape, position and size off a one-object (128, 128, 3) uint8 image."""
    image = np.asarray(image)
    if image.shape != (world.SIZE, world.SIZE, 3):
        raise ValueError(f"expected a ({world.SIZE}, {world.SIZE}, 3) image, got shape {image.shape}")
    img = image.astype(np.float64)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = nearest_color(bg_rgb)

    diff = img - bg_rgb
    seed = largest_component(np.sqrt((diff ** 2).sum(axis=2)) > SEED_DISTANCE)
    if seed.sum() < MIN_AREA:
        return Detection(background, found=False, area=int(seed.sum()))
    interior = erode(seed, 2)
    obj_rgb = np.median(img[interior if interior.sum() >= MIN_AREA // 4 else seed], axis=0)

    # half-intensity edge: how far each pixel lies along the line from the background to the object color
    axis = obj_rgb - bg_rgb
    t = box3((diff @ axis) / max(float(axis @ axis), 1e-6))
    mask = largest_component(t > 0.5)
    area = int(mask.sum())
    if area < MIN_AREA:
        return Detection(background, found=False, area=area)
    interior = erode(mask, 2)
    color = nearest_color(np.median(img[interior if interior.sum() >= MIN_AREA // 4 else mask], axis=0))

    hull = convex_hull(_outline_corners(mask))
    rect = min_rect_area(hull)
    solidity, rect_fill, hull_fill = area / polygon_area(hull), area / rect, polygon_area(hull) / rect
    ys, xs = np.nonzero(mask)
    cy_rel = (ys.mean() + 0.5 - ys.min()) / (ys.max() + 1 - ys.min())  # centroid height in the box, 0 = top
    shape = classify_shape(solidity, rect_fill, hull_fill, cy_rel)

    center = ((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2)
    half_extent = math.sqrt(area / SHAPE_AREA[shape])
    return Detection(background, True, color, shape, nearest_position(*center), nearest_size(half_extent), area,
                     float(solidity), float(rect_fill), float(hull_fill), float(cy_rel),
                     (float(center[0]), float(center[1])), half_extent)



def analyze_objects(image: np.ndarray, count: int) -> tuple[str, list[Detection]]:
    """(background, detections) of the `count` largest objects of a (128, 128, 3) uint8 image, each read as
    `analyze` reads one object alone: its pixels are those of its own seed component, the rest set to the background.
    Fewer detections come back when fewer objects stand out."""
    image = np.asarray(image)
    if image.shape != (world.SIZE, world.SIZE, 3):
        raise ValueError(f"expected a ({world.SIZE}, {world.SIZE}, 3) image, got shape {image.shape}")
    img = image.astype(np.float64)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    far = np.sqrt(((img - bg_rgb) ** 2).sum(axis=2)) > SEED_DISTANCE
    rows, starts, ends, comp = label_runs(far)
    if len(rows) == 0:
        return nearest_color(bg_rgb), []
    sizes = np.bincount(comp, weights=ends - starts)
    found = []
    for c in np.argsort(-sizes)[:count]:
        if sizes[c] < MIN_AREA:
            break
        own = np.zeros(far.shape, dtype=bool)
        for r, s0, e in zip(rows[comp == c], starts[comp == c], ends[comp == c]):
            own[r, s0:e] = True
        # this object alone: its component grown by 3 px (its soft edge), everything else the background color
        grown = own.copy()
        for _ in range(3):
            p = np.pad(grown, 1)
            grown = grown | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
        alone = np.where(grown[..., None], img, bg_rgb).round().clip(0, 255).astype(np.uint8)
        found.append(analyze(alone))
    return nearest_color(bg_rgb), found


def score_detection(scene: world.Scene, det: Detection) -> dict[str, bool]:
    """Per-attribute correctness of a detection for a one-object scene, plus "all"."""
    if len(scene.objects) != 1:
        raise ValueError(f"scoring checks one-object scenes, got {len(scene.objects)} objects")
    obj = scene.objects[0]
    result = {"background": det.background == scene.background,
              "color": det.found and det.color == obj.color, "shape": det.found and det.shape == obj.shape,
              "position": det.found and det.position == obj.position, "size": det.found and det.size == obj.size}
    result["all"] = all(result.values())
    return result


def score_objects(scene: world.Scene, background: str, found: list[Detection]) -> dict[str, float]:
    """Scores of a scene of any number of objects against the detections: each detection is matched to the object
    at the nearest position (one to one, the assignment with the most attributes right); an attribute's score is
    the share of the scene's objects that have it right, "all" is 1.0 when the background and every attribute of
    every object are right (missing objects are wrong on every attribute)."""
    import itertools

    objs = scene.objects
    best, best_right = None, -1
    for perm in itertools.permutations(range(len(found)), min(len(found), len(objs))):
        pairs = list(zip(objs, [found[i] for i in perm]))
        right = sum(getattr(d, a) == getattr(o, a) for o, d in pairs for a in ("color", "shape", "position", "size"))
        if right > best_right:
            best, best_right = pairs, right
    result = {"background": float(background == scene.background)}
    for a in ("color", "shape", "position", "size"):
        result[a] = sum(getattr(d, a) == getattr(o, a) for o, d in best or []) / len(objs)
    result["all"] = float(result["background"] == 1.0 and all(result[a] == 1.0
                                                                for a in ("color", "shape", "position", "size")))
    return result


def score(scene: world.Scene, image: np.ndarray) -> dict[str, bool]:
    """Per-attribute correctness of an image for a one-object scene, plus "all"."""
    return score_detection(scene, analyze(image))

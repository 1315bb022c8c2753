"""A generated image-text world: small images of coloured, textured shapes, and captions describing them.

Everything is drawn from a seeded ``numpy`` generator and rendered with PIL, so the same seed gives
the same bytes on every machine; no image or text is copied from anywhere.  The world is what the
bundled ``vlp-world`` CLIP is pretrained on (``vlprompt world pretrain``) and what the ``world-*``
data sets sample their classes from (:mod:`vlprompt.data.worldsets`).  docs/world.md describes it.

A scene is a background plus one to three objects; an object has a shape, a colour, a size, a fill
texture and a position.  Images are rendered at twice the output size and box-downsampled, which
anti-aliases edges and keeps thin textures visible at 32 x 32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (235, 220, 40),
    "green": (40, 165, 60),
    "cyan": (40, 205, 215),
    "blue": (40, 70, 225),
    "purple": (140, 55, 190),
    "pink": (245, 130, 190),
}
#: named sizes and their radius range as a fraction of the image side ("medium" is never named)
SIZES: dict[str, tuple[float, float]] = {"small": (0.12, 0.16), "medium": (0.19, 0.23), "large": (0.27, 0.32)}
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS: tuple[str, ...] = ("black", "white", "gray", "noisy")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "middle")
NUMBER_WORDS = ("zero", "one", "two", "three")

IMAGE_SIZE = 32
_SUPERSAMPLE = 2
_PERIOD = 4  # texture period in output pixels


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    size: str
    texture: str
    x: float  # centre, as a fraction of the image side
    y: float
    radius: float  # fraction of the image side


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[WorldObject, ...]


# ----------------------------------------------------------------------------------------- sampling
def sample_object(
    rng: np.random.Generator,
    *,
    shape: str | None = None,
    colour: str | None = None,
    size: str | None = None,
    texture: str | None = None,
    placed: tuple[WorldObject, ...] = (),
) -> WorldObject:
    """One object; unspecified attributes are drawn uniformly, the position avoids ``placed`` objects."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    size = size or list(SIZES)[rng.integers(len(SIZES))]
    texture = texture or TEXTURES[rng.integers(len(TEXTURES))]
    lo, hi = SIZES[size]
    radius = float(rng.uniform(lo, hi))
    best, best_gap = (0.5, 0.5), -1.0
    for _ in range(12):  # a few tries for a spot that overlaps nothing; keep the least-overlapping
        x, y = (float(v) for v in rng.uniform(radius, 1.0 - radius, size=2))
        gap = min((np.hypot(x - o.x, y - o.y) - radius - o.radius for o in placed), default=1.0)
        if gap > best_gap:
            best, best_gap = (x, y), gap
        if gap > 0.02:
            break
    return WorldObject(shape, colour, size, texture, best[0], best[1], radius)


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, **main: str | None) -> Scene:
    """A background and 1-3 objects (``n_objects``); ``main`` fixes attributes of the first object."""
    n = int(n_objects if n_objects is not None else rng.choice([1, 1, 2, 3]))
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    objs: tuple[WorldObject, ...] = (sample_object(rng, **main),)
    for _ in range(n - 1):
        objs = (*objs, sample_object(rng, placed=objs))
    return Scene(background, objs)


# ---------------------------------------------------------------------------------------- rendering
def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)]
    if shape == "hexagon":
        a = np.arange(6) * np.pi / 3
        return [(cx + r * np.cos(t), cy + r * np.sin(t)) for t in a]
    if shape == "star":
        pts = []
        for k in range(10):
            t = -np.pi / 2 + k * np.pi / 5
            rr = r if k % 2 == 0 else 0.45 * r
            pts.append((cx + rr * np.cos(t), cy + rr * np.sin(t)))
        return pts
    if shape == "cross":
        w = 0.34 * r
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
            (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
            (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"no polygon for shape {shape!r}")


def shape_mask(shape: str, cx: float, cy: float, r: float, side: int) -> np.ndarray:
    """Boolean ``side x side`` mask of one shape (centre and radius in pixels)."""
    im = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(im)
    if shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            q = 0.55 * r
            draw.ellipse([cx - q, cy - q, cx + q, cy + q], fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=255)
    return np.asarray(im) > 127


def _texture(texture: str, side: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean pattern: True where the object's darker second tone goes."""
    p = _PERIOD * _SUPERSAMPLE
    yy, xx = np.mgrid[0:side, 0:side]
    ox, oy = rng.integers(p, size=2)
    xx, yy = xx + ox, yy + oy
    if texture == "plain":
        return np.zeros((side, side), dtype=bool)
    if texture == "striped":
        coord = yy if rng.random() < 0.5 else xx + yy
        return (coord % p) < p // 2
    if texture == "dotted":
        return ((xx % p) - p / 2 + 0.5) ** 2 + ((yy % p) - p / 2 + 0.5) ** 2 <= (p * 0.28) ** 2
    if texture == "checkered":
        return ((xx // (p // 2)) + (yy // (p // 2))) % 2 == 0
    raise ValueError(f"unknown texture {texture!r}")


def _background(name: str, side: int, rng: np.random.Generator) -> np.ndarray:
    base = {"black": 20.0, "white": 235.0, "gray": 128.0}
    if name == "noisy":
        grid = rng.uniform(40, 210, size=(side // 4, side // 4, 1))
        img = np.kron(grid, np.ones((4, 4, 1))) + rng.normal(0, 25, size=(side, side, 1))
        return np.repeat(img, 3, axis=2)
    level = base[name] + rng.uniform(-15, 15)
    return np.full((side, side, 3), level) + rng.normal(0, 4, size=(side, side, 3))


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """``size x size x 3`` uint8 image of ``scene``; ``rng`` draws colour jitter, noise and texture phase.

    Objects are painted back to front (the first object last, so it is never hidden).
    """
    side = size * _SUPERSAMPLE
    img = _background(scene.background, side, rng)
    for obj in reversed(scene.objects):
        mask = shape_mask(obj.shape, obj.x * side, obj.y * side, obj.radius * side, side)
        colour = np.clip(np.asarray(COLOURS[obj.colour], float) + rng.uniform(-18, 18, size=3), 0, 255)
        dark = colour * 0.35
        pattern = _texture(obj.texture, side, rng)
        paint = np.where(pattern[..., None], dark, colour)
        img = np.where(mask[..., None], paint, img)
    img = np.clip(img, 0, 255).reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.round(img).astype(np.uint8)


# ------------------------------------------------------------------------------------------ captions
def _position(obj: WorldObject) -> str:
    dx, dy = obj.x - 0.5, obj.y - 0.5
    if max(abs(dx), abs(dy)) < 0.12:
        return "middle"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def describe(obj: WorldObject, rng: np.random.Generator, p_colour: float = 0.6) -> str:
    """A noun phrase for one object naming a random subset of its attributes (the shape always)."""
    words = []
    if obj.size != "medium" and rng.random() < 0.35:
        words.append(obj.size)
    if rng.random() < (0.25 if obj.texture == "plain" else 0.6):
        words.append(obj.texture)
    if rng.random() < p_colour:
        words.append(obj.colour)
    return " ".join([*words, obj.shape])


#: caption templates; {o} is the main object's phrase, {o2} another object's, {bg} the background,
#: {pos} the main object's position, {n} the number of objects in words
TEMPLATES_ONE: tuple[str, ...] = (
    "a {o}.",
    "a photo of a {o}.",
    "a picture of a {o}.",
    "an image of a {o}.",
    "a drawing of a {o}.",
    "a {o} on a {bg} background.",
    "a photo of a {o} on a {bg} background.",
    "a {o} in front of a {bg} background.",
    "there is a {o}.",
    "a {o} on the {pos}.",
    "a photo of a {o} on the {pos}.",
    "{o}.",
    "a small picture of a {o}.",
    "a rendering of a {o}.",
)
TEMPLATES_MANY: tuple[str, ...] = (
    "a {o} and a {o2}.",
    "a photo of a {o} and a {o2}.",
    "a {o} next to a {o2}.",
    "{n} shapes: a {o} and a {o2}.",
    "a picture of {n} shapes on a {bg} background.",
    "a photo of a {o} with {n} shapes.",
    "a {o} among {n} shapes.",
)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption of ``scene`` from the templates above (lower case; CLIP's tokenizer lower-cases)."""
    main = scene.objects[0]
    n = len(scene.objects)
    if n > 1 and rng.random() < 0.45:
        template = TEMPLATES_MANY[rng.integers(len(TEMPLATES_MANY))]
    else:
        template = TEMPLATES_ONE[rng.integers(len(TEMPLATES_ONE))]
    other = scene.objects[1 + rng.integers(n - 1)] if n > 1 else main
    return template.format(
        o=describe(main, rng),
        o2=describe(other, rng),
        bg=scene.background,
        pos=_position(main),
        n=NUMBER_WORDS[n],
    )


def sample_pair(seed: int, index: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, str]:
    """The ``index``-th (image, caption) pair of the world stream ``seed`` -- random access, deterministic."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng)
    return render(scene, rng, size), caption(scene, rng)


def sample_batch(seed: int, start: int, count: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[str]]:
    """Pairs ``start .. start+count-1`` of stream ``seed``: a ``(count, size, size, 3)`` array, captions."""
    pairs = [sample_pair(seed, i, size) for i in range(start, start + count)]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def vocabulary() -> list[str]:
    """Every word the captions and the world data sets' class names can use (for docs and checks)."""
    words = set(SHAPES) | set(COLOURS) | set(TEXTURES) | set(BACKGROUNDS) | set(POSITIONS)
    words |= {"small", "large", *NUMBER_WORDS[1:], "shapes", "background"}
    for t in TEMPLATES_ONE + TEMPLATES_MANY:
        for w in t.replace(".", " ").replace(":", " ").split():
            if not w.startswith("{"):
                words.add(w)
    return sorted(words)

"""The generated world (v3): images of coloured, textured shapes, their captions, and four rendering styles.

Everything is drawn from a seeded ``numpy`` generator and rendered with PIL, so the same seed gives the
same bytes on every machine; no image or text is copied from anywhere.  The world is what the bundled
``vlp-world`` CLIP is pretrained on (:mod:`vlprompt.world.pretrain`) and what the ``world-*`` data sets
sample their classes from (:mod:`vlprompt.world.sets`).  docs/world.md describes it.

A scene is a background plus one to four objects; an object has a shape, a colour, a size, a fill
texture and a position.  Every attribute a caption names can be seen at the image size: 48 x 48 pixels
(rendered at 96 and box-downsampled), objects of 14-35 px across, textures of period 8 px, eight shapes
chosen to differ in outline (no hexagon-vs-circle pairs).  A *domain* is a rendering style of the same
scene (``photo``, ``sketch``, ``noisy``, ``painting``): the domain generalisation protocol trains on
one and tests on the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "moon")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (250, 145, 20),
    "yellow": (240, 225, 40),
    "green": (35, 170, 55),
    "cyan": (40, 210, 220),
    "blue": (35, 65, 230),
    "purple": (145, 50, 195),
    "pink": (250, 135, 200),
}
#: size name -> radius range as a fraction of the image side ("medium" is never named in text)
SIZES: dict[str, tuple[float, float]] = {"small": (0.15, 0.18), "medium": (0.22, 0.26), "large": (0.31, 0.36)}
NAMED_SIZES: tuple[str, ...] = ("small", "large")
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS: tuple[str, ...] = ("black", "white", "gray", "noisy")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "middle")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
#: rendering styles of the same scene; "photo" is the default (and most of pretraining)
DOMAINS: tuple[str, ...] = ("photo", "sketch", "noisy", "painting")
#: the word a caption uses for each domain ("a sketch of a red circle.")
DOMAIN_WORDS: dict[str, str] = {
    "photo": "photo",
    "sketch": "sketch",
    "noisy": "noisy photo",
    "painting": "painting",
}

IMAGE_SIZE = 48
_SUPERSAMPLE = 2
_PERIOD = 8  # texture period in output pixels: one period per patch of vlp-world's patch-8 ViT


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


def _pick(rng: np.random.Generator, values) -> str:
    values = tuple(values)
    return values[int(rng.integers(len(values)))]


# ----------------------------------------------------------------------------------------- sampling
_POSITION_CENTRES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73)}


def sample_object(
    rng: np.random.Generator,
    *,
    shape: str | None = None,
    colour: str | None = None,
    size: str | None = None,
    texture: str | None = None,
    position: str | None = None,
    placed: tuple[WorldObject, ...] = (),
    near_middle: bool = False,
) -> WorldObject:
    """One object; unspecified attributes are drawn uniformly, the position avoids ``placed`` objects.

    ``position`` (left/right/top/bottom/middle) puts the centre well inside that region, so the
    position a caption names is unambiguous; ``near_middle`` puts it within 0.12 of the image centre
    (an "iconic" photo, the object in view as photographers frame it).
    """
    shape = shape or _pick(rng, SHAPES)
    colour = colour or _pick(rng, COLOURS)
    size = size or _pick(rng, SIZES)
    texture = texture or _pick(rng, TEXTURES)
    lo, hi = SIZES[size]
    radius = float(rng.uniform(lo, hi))
    if position is not None:
        if position == "middle":
            cx, cy = 0.5, 0.5
        else:
            cx, cy = _POSITION_CENTRES[position]
            radius = min(radius, 0.22)  # keep the object on its side of the image
        jitter = rng.uniform(-0.04, 0.04, size=2)
        x = float(np.clip(cx + jitter[0], radius, 1 - radius))
        y = float(np.clip(cy + jitter[1], radius, 1 - radius))
        return WorldObject(shape, colour, size, texture, x, y, radius)
    if near_middle:
        x, y = (float(np.clip(0.5 + v, radius, 1 - radius)) for v in rng.uniform(-0.12, 0.12, size=2))
        return WorldObject(shape, colour, size, texture, x, y, radius)
    best, best_gap = (0.5, 0.5), -1.0
    for _ in range(16):  # a few tries for a spot that overlaps nothing; keep the least-overlapping
        x, y = (float(v) for v in rng.uniform(radius, 1.0 - radius, size=2))
        gap = min((np.hypot(x - o.x, y - o.y) - radius - o.radius for o in placed), default=1.0)
        if gap > best_gap:
            best, best_gap = (x, y), gap
        if gap > 0.02:
            break
    return WorldObject(shape, colour, size, texture, best[0], best[1], radius)


#: share of scenes whose first object is near the middle (world v3; v2 placed it anywhere)
ICONIC = 0.75


def sample_scene(
    rng: np.random.Generator, n_objects: int | None = None, background: str | None = None, **main: str | None
) -> Scene:
    """A background and 1-4 objects (``n_objects``); ``main`` fixes attributes of the first object.

    Objects after the first are small or medium, so the first (the one a caption is about) stays the
    largest unless it is small itself.  The first object is near the middle in ``ICONIC`` of the
    scenes (unless ``main`` fixes its position), as most photos frame their subject: a ViT trained
    from scratch learns shape from such scenes in hundreds of steps, and from scenes with the object
    anywhere not in thousands (world v2).
    """
    n = int(n_objects if n_objects is not None else _pick(rng, (1, 1, 1, 1, 1, 1, 2, 2, 3, 4)))
    background = background or _pick(rng, BACKGROUNDS)
    if n > 2 and main.get("size") is None:
        main = {**main, "size": _pick(rng, ("small", "medium"))}
    iconic = rng.random() < ICONIC and main.get("position") is None
    objs: tuple[WorldObject, ...] = (sample_object(rng, **main, near_middle=iconic),)
    for _ in range(n - 1):
        objs = (*objs, sample_object(rng, size=_pick(rng, ("small", "medium")), placed=objs))
    return Scene(background, objs)


# ---------------------------------------------------------------------------------------- rendering
def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.82
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if shape == "star":
        pts = []
        for k in range(10):
            t = -np.pi / 2 + k * np.pi / 5
            rr = r if k % 2 == 0 else 0.42 * r
            pts.append((cx + rr * np.cos(t), cy + rr * np.sin(t)))
        return pts
    if shape == "cross":
        w = 0.32 * r
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
    if shape in ("circle", "ring", "moon"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if shape == "ring":
            q = 0.5 * r
            draw.ellipse([cx - q, cy - q, cx + q, cy + q], fill=0)
        elif shape == "moon":
            ox = cx + 0.45 * r
            draw.ellipse([ox - 0.85 * r, cy - 0.85 * r, ox + 0.85 * r, cy + 0.85 * r], fill=0)
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
        coord = (yy, xx, xx + yy)[int(rng.integers(3))]
        return (coord % p) < p // 2
    if texture == "dotted":
        return ((xx % p) - p / 2 + 0.5) ** 2 + ((yy % p) - p / 2 + 0.5) ** 2 <= (p * 0.3) ** 2
    if texture == "checkered":
        return ((xx // (p // 2)) + (yy // (p // 2))) % 2 == 0
    raise ValueError(f"unknown texture {texture!r}")


def _background(name: str, side: int, rng: np.random.Generator) -> np.ndarray:
    if name == "noisy":
        cells = side // 8
        grid = rng.uniform(50, 200, size=(cells, cells, 1))
        img = np.kron(grid, np.ones((8, 8, 1))) + rng.normal(0, 20, size=(side, side, 1))
        return np.repeat(img, 3, axis=2)
    level = {"black": 20.0, "white": 235.0, "gray": 128.0}[name] + rng.uniform(-12, 12)
    return np.full((side, side, 3), level) + rng.normal(0, 4, size=(side, side, 3))


def _edge(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` of its outside (a thick outline)."""
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    inner = np.asarray(im.filter(ImageFilter.MinFilter(2 * width + 1))) > 127
    return mask & ~inner


def render(
    scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE, domain: str = "photo"
) -> np.ndarray:
    """``size x size x 3`` uint8 image of ``scene`` in style ``domain``.

    ``rng`` draws colour jitter, noise and texture phase; objects are painted back to front (the
    first object last, so it is never hidden).  Domains: ``photo`` (flat colours, the textures in a
    darker tone); ``sketch`` (paper background, a thick coloured outline and the texture drawn as
    coloured lines, no fill); ``noisy`` (the photo under heavy pixel noise and a blur); ``painting``
    (paler, warmer colours, soft edges and brush-stroke streaks).
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}")
    side = size * _SUPERSAMPLE
    if domain == "sketch":
        img = np.full((side, side, 3), 242.0) + rng.normal(0, 3, size=(side, side, 3))
    else:
        img = _background(scene.background, side, rng)
    for obj in reversed(scene.objects):
        mask = shape_mask(obj.shape, obj.x * side, obj.y * side, obj.radius * side, side)
        colour = np.clip(np.asarray(COLOURS[obj.colour], float) + rng.uniform(-15, 15, size=3), 0, 255)
        pattern = _texture(obj.texture, side, rng)
        if domain == "sketch":
            ink = _edge(mask, 2) | (mask & pattern)
            img = np.where(ink[..., None], colour * 0.9, np.where(mask[..., None], 242.0, img))
            continue
        if domain == "painting":
            colour = 0.7 * colour + 0.3 * np.array([235.0, 215.0, 180.0])
        paint = np.where(pattern[..., None], colour * 0.35, colour)
        img = np.where(mask[..., None], paint, img)
    if domain == "painting":
        wash = np.kron(rng.normal(0, 10, size=(side // 16, side // 16, 3)), np.ones((16, 16, 1)))
        img = np.asarray(
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.BoxBlur(2))
        )
        img = img.astype(float) + wash  # soft edges and a blotchy colour wash
    elif domain == "noisy":
        img = np.asarray(
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.BoxBlur(1))
        )
        img = img.astype(float) + rng.normal(0, 45, size=(side, side, 1))
    img = np.clip(img, 0, 255).reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.round(img).astype(np.uint8)


# ------------------------------------------------------------------------------------------ captions
def position_of(obj: WorldObject) -> str:
    """Where a caption says the object is (left/right/top/bottom/middle)."""
    dx, dy = obj.x - 0.5, obj.y - 0.5
    if max(abs(dx), abs(dy)) < 0.12:
        return "middle"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def describe(obj: WorldObject, rng: np.random.Generator) -> str:
    """A noun phrase naming a random subset of the object's attributes.

    The shape is named 85 % of the time, else the generic noun "shape" ("a red striped shape"), so
    that "a {attribute} shape" prompts are text the model has read.
    """
    words = []
    if obj.size != "medium" and rng.random() < 0.7:
        words.append(obj.size)
    if rng.random() < (0.5 if obj.texture == "plain" else 0.85):
        words.append(obj.texture)
    if rng.random() < 0.85:
        words.append(obj.colour)
    noun = obj.shape if (rng.random() < 0.85 or not words) else "shape"
    return " ".join([*words, noun])


#: caption templates; {d} the domain word ("photo", "sketch", ...), {o} the main object's phrase,
#: {o2} another object's, {bg} the background, {pos} the main object's position, {n} the number of
#: objects in words.  All use the article "a" (so "a orange star"): the prompt "a photo of a {}."
#: then matches the captions word for word.
TEMPLATES_ONE: tuple[str, ...] = (
    "a {o}.",
    "a {d} of a {o}.",
    "a {d} of a {o}.",
    "a picture of a {o}.",
    "an image of a {o}.",
    "a {o} on a {bg} background.",
    "a {d} of a {o} on a {bg} background.",
    "a {o} in front of a {bg} background.",
    "a shape on a {bg} background.",
    "there is a {o}.",
    "a {o} on the {pos}.",
    "a {d} of a {o} on the {pos}.",
    "one shape: a {o}.",
    "{o}.",
    "figure x: a {o}.",
)
TEMPLATES_MANY: tuple[str, ...] = (
    "a {o} and a {o2}.",
    "a {d} of a {o} and a {o2}.",
    "a {o} next to a {o2}.",
    "{n} shapes: a {o} and a {o2}.",
    "a {d} of {n} shapes.",
    "{n} shapes on a {bg} background.",
    "a {d} of a {o} with {n} shapes.",
)


def caption(scene: Scene, rng: np.random.Generator, domain: str = "photo") -> str:
    """One caption of ``scene`` from the templates above (lower case; CLIP's tokenizer lower-cases)."""
    main = scene.objects[0]
    n = len(scene.objects)
    if n > 1 and rng.random() < 0.5:
        template = _pick(rng, TEMPLATES_MANY)
    else:
        template = _pick(rng, TEMPLATES_ONE)
    other = scene.objects[1 + int(rng.integers(n - 1))] if n > 1 else main
    if domain == "sketch" and "{bg}" in template:  # a sketch has no background colour to name
        template = "a {d} of a {o}."
    return template.format(
        d=DOMAIN_WORDS[domain],
        o=describe(main, rng),
        o2=describe(other, rng),
        bg=scene.background,
        pos=position_of(main),
        n=NUMBER_WORDS[n],
    )


def _domain_for(rng: np.random.Generator) -> str:
    """Pretraining mostly sees photos, a little of every other style (as CLIP's data does)."""
    u = rng.random()
    return "photo" if u < 0.85 else DOMAINS[1 + int((u - 0.85) / 0.05001)]


#: pairs per "family" of the pretraining stream.  Consecutive pairs come in families of 8 one-object
#: scenes that share everything but one attribute -- the shape (all 8 shapes), the texture, the size or
#: the colour -- or (the other half) are drawn freely.  Inside a contrastive batch a family can only be
#: told apart by its varying attribute (hard negatives); without them a batch is solved by colour and
#: background alone, which is what the world-v1 and v2 checkpoints learned.
FAMILY = 8
FAMILY_KINDS = ("shape", "texture", "size", "colour")
FAMILY_WEIGHTS = (0.45, 0.3, 0.15, 0.1)  # shape and texture need the most examples (colour comes first)
FAMILY_SHARE = 0.75  # share of pairs in families


def _family_scene(rng: np.random.Generator, fam: np.random.Generator, member: int) -> Scene | None:
    """Member ``member`` of the family ``fam`` describes (``None``: a free scene)."""
    if fam.random() >= FAMILY_SHARE:
        return None
    kind = FAMILY_KINDS[int(fam.choice(len(FAMILY_KINDS), p=FAMILY_WEIGHTS))]
    fixed = {
        "shape": _pick(fam, SHAPES),
        "colour": _pick(fam, COLOURS),
        "size": _pick(fam, ("medium", "large")),
        "texture": _pick(fam, TEXTURES),
    }
    background = _pick(fam, BACKGROUNDS)
    values = {"shape": SHAPES, "texture": TEXTURES, "size": tuple(SIZES), "colour": tuple(COLOURS)}[kind]
    order = fam.permutation(len(values))
    fixed[kind] = values[int(order[member % len(values)])]
    return Scene(background, (sample_object(rng, **fixed, near_middle=True),))


#: the attributes of a scene's first object (and the background) that :func:`scene_labels` returns
LABELLED: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "texture": TEXTURES,
    "size": tuple(SIZES),
    "background": BACKGROUNDS,
}


def scene_labels(scene: Scene) -> list[int]:
    """Index of each :data:`LABELLED` attribute of the scene's first object (its background)."""
    main = scene.objects[0]
    return [
        values.index(scene.background if name == "background" else getattr(main, name))
        for name, values in LABELLED.items()
    ]


def _pair(seed: int, index: int, size: int) -> tuple[np.ndarray, str, list[int]]:
    rng = np.random.default_rng([seed, index])
    fam = np.random.default_rng([seed, index // FAMILY, 7])
    scene = _family_scene(rng, fam, index % FAMILY) or sample_scene(rng)
    domain = _domain_for(rng)
    return render(scene, rng, size, domain), caption(scene, rng, domain), scene_labels(scene)


def sample_pair(seed: int, index: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, str]:
    """The ``index``-th (image, caption) pair of the world stream ``seed`` -- random access, deterministic."""
    image, text, _ = _pair(seed, index, size)
    return image, text


def sample_batch(
    seed: int, start: int, count: int, size: int = IMAGE_SIZE, labels: bool = False
) -> tuple[np.ndarray, list[str]] | tuple[np.ndarray, list[str], np.ndarray]:
    """Pairs ``start .. start+count-1`` of stream ``seed``: a ``(count, size, size, 3)`` array, captions
    (and with ``labels`` a ``(count, 5)`` array of :func:`scene_labels`)."""
    pairs = [_pair(seed, i, size) for i in range(start, start + count)]
    images, texts = np.stack([p[0] for p in pairs]), [p[1] for p in pairs]
    if labels:
        return images, texts, np.asarray([p[2] for p in pairs], dtype=np.int64)
    return images, texts


def vocabulary() -> list[str]:
    """Every word the captions and the world data sets' class names can use (for docs and checks)."""
    words = set(SHAPES) | set(COLOURS) | set(TEXTURES) | set(BACKGROUNDS) | set(POSITIONS)
    words |= {*NAMED_SIZES, *NUMBER_WORDS[1:], "shape", "shapes", "background"}
    for w in DOMAIN_WORDS.values():
        words.update(w.split())
    for t in TEMPLATES_ONE + TEMPLATES_MANY:
        for w in t.replace(".", " ").replace(":", " ").split():
            if not w.startswith("{"):
                words.add(w)
    return sorted(words)

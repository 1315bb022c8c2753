"""Opening images safely: RGB conversion and one-line errors that name the bad file."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from PIL import Image, UnidentifiedImageError

from vlprompt.errors import VlpromptError

log = logging.getLogger(__name__)

IMAGE_EXTS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTS


def load_rgb(path: str) -> Image.Image:
    """Decode an image fully and convert it to RGB (greyscale, palette and RGBA images all occur in the sets).

    A missing, truncated or corrupt file raises :class:`VlpromptError` naming the file, never a PIL traceback.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise VlpromptError(
            f"image not found: {path}; restore it or pass --skip-bad (skip_bad=True in Python) to drop it"
        ) from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise VlpromptError(
            f"cannot read image {path} ({type(e).__name__}: {e}); replace the file or pass --skip-bad "
            "(skip_bad=True in Python) to drop it"
        ) from None


def image_problem(path: str, decode: bool = True) -> str | None:
    """Why ``path`` is not a usable image, or ``None``.

    ``decode=True`` decodes the pixels (what training will do; JPEGs at reduced scale via ``draft`` to
    keep it cheap). ``decode=False`` only parses the header and checks that a JPEG ends with its
    end-of-image marker, which catches truncation at a fraction of the cost.
    """
    try:
        with Image.open(path) as im:
            if decode:
                if im.format == "JPEG":
                    im.draft("RGB", (64, 64))
                im.load()
            else:
                fmt = im.format
                im.verify()
                if fmt == "JPEG":
                    with open(path, "rb") as f:
                        f.seek(max(0, os.path.getsize(path) - 64))
                        if b"\xff\xd9" not in f.read():
                            return "truncated JPEG (no end-of-image marker)"
    except FileNotFoundError:
        return "missing"
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def drop_unreadable(items: list, source: str, check: Callable[[str], str | None] = image_problem) -> list:
    """Drop items whose image cannot be decoded, logging how many (the ``skip_bad=True`` path)."""
    bad = [(d, why) for d in items if (why := check(d.impath))]
    if bad:
        log.warning(
            "dropping %d unreadable images from %s (first: %s: %s)",
            len(bad),
            source,
            bad[0][0].impath,
            bad[0][1],
        )
        gone = {id(d) for d, _ in bad}
        items = [d for d in items if id(d) not in gone]
    return items

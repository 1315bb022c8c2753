"""Opening images safely: RGB conversion and one-line errors that name the bad file."""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Callable

from PIL import Image, UnidentifiedImageError

from vlprompt.errors import VlpromptError

log = logging.getLogger(__name__)

#: PIL's own default (89.5 M pixels) doubled: the largest benchmark images are far below it
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
MAX_PIXELS_HINT = (
    "raise the limit if the image is genuine (--set data.max_image_pixels=N; predict: --max-image-pixels N; "
    "0 = no limit)"
)


def set_max_image_pixels(n: int | None) -> None:
    """The decompression-bomb limit (width x height) for every image decoded in this process; 0 = none.

    PIL refuses larger images with ``DecompressionBombError``; vlprompt turns that into a one-line
    error naming the file (or, with ``--skip-bad``, drops the file).
    """
    global _MAX_DECODE_BYTES
    Image.MAX_IMAGE_PIXELS = (
        None if not n else int(n) // 2
    )  # PIL raises at twice its limit and warns above it
    _MAX_DECODE_BYTES = None if not n else BYTES_PER_LIMIT_PIXEL * int(n)


#: ours: the memory one image may take to decode and convert to RGB, per pixel of the pixel limit
#: (PIL keeps 3- and 4-band images at 4 bytes a pixel): 4 x 178,956,970 = 716 MB at the default.  A
#: small file can declare a huge canvas (a 600 KB PNG of 13000 x 13000 RGBA needs 1.4 GB): its header
#: is checked against this before any pixel is allocated.
BYTES_PER_LIMIT_PIXEL = 4
_MAX_DECODE_BYTES: int | None = None


def decode_bytes(im: Image.Image) -> int:
    """Bytes PIL allocates to decode ``im`` (from its header) and convert it to RGB."""
    w, h = im.size
    bands = len(im.getbands())
    per = 4 if bands >= 3 or im.mode in ("I", "F") else 2 if im.mode.startswith("I;16") else bands
    return w * h * (per + 4)


def check_decode_budget(im: Image.Image, path: str) -> None:
    """Refuse (before allocating) an image whose decoded size exceeds the byte budget."""
    if _MAX_DECODE_BYTES is not None and (need := decode_bytes(im)) > _MAX_DECODE_BYTES:
        w, h = im.size
        raise Image.DecompressionBombError(
            f"{w}x{h} {im.mode} needs {need / 2**20:,.0f} MB to decode, over the "
            f"{_MAX_DECODE_BYTES / 2**20:,.0f} MB budget ({w * h} pixels)"
        )


set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)

IMAGE_EXTS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTS


def load_rgb(path: str) -> Image.Image:
    """Decode an image fully and convert it to RGB (greyscale, palette and RGBA images all occur in the sets).

    A missing, truncated or corrupt file raises :class:`VlpromptError` naming the file, never a PIL traceback.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check_decode_budget(im, path)
                im.load()
                return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise VlpromptError(
            f"image {path} is too large to decode safely ({_bomb(e)}); {MAX_PIXELS_HINT}, "
            "or pass --skip-bad to drop it"
        ) from None
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _problem(path, decode)
    except Image.DecompressionBombError as e:
        return f"too large to decode safely ({_bomb(e)})"
    except FileNotFoundError:
        return "missing"
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        return f"{type(e).__name__}: {e}"


def _bomb(e: Exception) -> str:

    if "MB budget" in str(e):
        return str(e).split(" (")[0]
    m = re.search(r"\((\d+) pixels\)", str(e))
    return f"{int(m.group(1)):,} pixels" if m else "over the pixel limit"


def _problem(path: str, decode: bool) -> str | None:
    with Image.open(path) as im:
        if decode:
            if im.format == "JPEG":
                im.draft("RGB", (64, 64))
            check_decode_budget(im, path)
            im.load()
            return None
        fmt = im.format
        im.verify()
    if fmt == "JPEG":
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 64))
            if b"\xff\xd9" not in f.read():
                return "truncated JPEG (no end-of-image marker)"
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

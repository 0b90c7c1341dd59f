"""Safe image decoding shared by serving and training.

Images arrive as untrusted bytes (data URIs over HTTP, files in datasets). The checks here
run before any pixel is decoded: the declared size is read from the header and refused when
it exceeds a pixel budget, which is what defuses decompression bombs (a few KB of PNG that
declares 100k x 100k pixels). Everything returned is an RGB `PIL.Image` the towers accept.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

from encoders.errors import ImageDecodeError

DATA_URI_PREFIX = "data:image/"
_DATA_URI = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?(;[A-Za-z0-9=._-]+)*;base64,", re.ASCII)
DEFAULT_MAX_PIXELS = 40_000_000


def is_image_data_uri(value: str) -> bool:
    return value.startswith(DATA_URI_PREFIX)


def decode_data_uri(uri: str) -> bytes:
    """Return the bytes of a `data:image/...;base64,` URI, or raise with what is wrong."""
    match = _DATA_URI.match(uri[:200])
    if match is None:
        raise ImageDecodeError("not a base64 image data URI: expected 'data:image/<type>;base64,<data>'")
    payload = uri[match.end() :]
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageDecodeError(f"invalid base64 in image data URI: {exc}") from None


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None) -> Image.Image:
    """Decode untrusted bytes into an RGB image.

    `max_pixels` bounds the *declared* width x height, checked before decoding. `max_side`,
    when given, shrinks larger images right after decoding so a queue of pending images
    holds small pictures, not camera originals (the towers resize far below it anyway).
    """
    if not data:
        raise ImageDecodeError("empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image declares {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels}; send a smaller image"
                )
            if max_side is not None and image.format == "JPEG":
                image.draft("RGB", (max_side, max_side))
            image.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image: the bytes are in no image format Pillow knows") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None
    if image.mode != "RGB":
        image = image.convert("RGB")
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    return image

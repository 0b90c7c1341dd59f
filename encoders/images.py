"""Safe image decoding shared by serving and training.

Images arrive as untrusted bytes (data URIs over HTTP, files in datasets). The checks here
run before any pixel is decoded: the declared size is read from the header and refused when
it exceeds a pixel budget, which is what defuses decompression bombs (a few KB of PNG that
declares 100k x 100k pixels). Everything returned is an RGB `PIL.Image` the towers accept,
reduced while it is decoded to the size the model's preprocessing would resize it to, so a
queue of pending images holds small pictures and the memory an image will need is known (and
can be budgeted) before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

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


@dataclass
class PendingImage:
    """An image whose header was read and checked, and whose pixels are not decoded yet.

    `decode_bytes` is the most memory its decoding holds at once (the decoded pixels at the
    size the decoder will produce, plus an RGB copy when it must be converted); `held_bytes`
    what the returned, downscaled RGB image holds afterwards. Both are known before any pixel
    is decoded, so a caller can count them against a memory budget first.
    """

    image: Image.Image
    size: tuple[int, int]  # what `decode` returns
    decode_bytes: int
    held_bytes: int

    def decode(self) -> Image.Image:
        """Decode, convert to RGB and downscale at once; the full-size pixels are released here."""
        image = self.image
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
            if image.mode != "RGB":
                converted = image.convert("RGB")
                image.close()
                image = converted
            if image.size != self.size:
                # Bicubic without a reducing gap: what the CLIP-style processors do themselves, so
                # their own resize to the size given here is a no-op and vectors do not change.
                resized = image.resize(self.size, Image.Resampling.BICUBIC)
                image.close()
                image = resized
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(f"image refused as a decompression bomb: {exc}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None
        finally:
            self.image = _RELEASED  # no reference to the full-size pixels or the encoded bytes outlives this
        return image


_RELEASED = Image.new("RGB", (1, 1))
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3}


def target_size(width: int, height: int, min_side: int | None, max_side: int | None) -> tuple[int, int]:
    """The size an image is reduced to as it is decoded, keeping its aspect ratio.

    `min_side` is the model's input size: the shorter edge goes down to it (never up), computed
    as transformers' `shortest_edge` resize computes it. `max_side` caps the longer edge too.
    """
    w, h = width, height
    if min_side is not None and min(w, h) > min_side:
        short, long = (w, h) if w <= h else (h, w)
        long = max(1, int(min_side * long / short))
        w, h = (min_side, long) if width <= height else (long, min_side)
    if max_side is not None and max(w, h) > max_side:
        scale = max_side / max(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
    return w, h


def open_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None, max_side: int | None = None
) -> PendingImage:
    """Read and check the header of untrusted image bytes; decode nothing yet.

    `max_pixels` bounds the *declared* width x height (decompression bombs). The image will be
    reduced to `target_size(..., min_side, max_side)` as it is decoded; a JPEG is decoded at a
    reduced scale straight away (`draft`), so its full-size pixels never exist.
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
            size = target_size(width, height, min_side, max_side)
            if image.format == "JPEG" and size != (width, height):
                image.draft("RGB", size)  # DCT scaling: decodes at 1/2, 1/4 or 1/8, still >= size
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image: the bytes are in no image format Pillow knows") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None
    decoded = image.size[0] * image.size[1]
    per_pixel = _BYTES_PER_PIXEL.get(image.mode, 4)
    held = size[0] * size[1] * 3
    converted = decoded * 3 if image.mode != "RGB" else 0
    return PendingImage(image, size, decoded * per_pixel + converted + held, held)


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None, min_side: int | None = None
) -> Image.Image:
    """Decode untrusted bytes into an RGB image, reduced as `open_image` describes.

    `max_side`, when given, shrinks larger images right after decoding so a queue of pending
    images holds small pictures, not camera originals; `min_side` (the model's input size)
    shrinks them further, to what the model's own preprocessing would resize them to.
    """
    return open_image(data, max_pixels=max_pixels, min_side=min_side, max_side=max_side).decode()

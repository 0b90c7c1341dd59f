from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from encoders.errors import ImageDecodeError
from encoders.images import decode_data_uri, decode_image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_decodes_any_mode_to_rgb():
    image = decode_image(_png(Image.new("L", (10, 7), 128)))
    assert image.mode == "RGB" and image.size == (10, 7)


def test_shrinks_to_max_side_keeping_aspect():
    image = decode_image(_png(Image.new("RGB", (400, 200))), max_side=100)
    assert image.size == (100, 50)


def test_decompression_bomb_is_refused_before_decoding():
    # 20000 x 20000 1-bit pixels: a few KB of PNG declaring 400 M pixels.
    bomb = _png(Image.new("1", (20000, 20000)))
    assert len(bomb) < 100_000
    with pytest.raises(ImageDecodeError, match="400000000 pixels"):
        decode_image(bomb, max_pixels=40_000_000)


@pytest.mark.parametrize("data", [b"", b"not an image at all", _png(Image.new("RGB", (8, 8)))[:40]])
def test_corrupt_bytes_are_refused(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data)


def test_data_uri_round_trip_and_errors():
    payload = _png(Image.new("RGB", (4, 4)))
    assert decode_data_uri("data:image/png;base64," + base64.b64encode(payload).decode()) == payload
    with pytest.raises(ImageDecodeError, match="invalid base64"):
        decode_data_uri("data:image/png;base64,@@@not-base64@@@")
    with pytest.raises(ImageDecodeError, match="data URI"):
        decode_data_uri("data:text/plain,hello")

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from encoders.errors import ImageDecodeError
from encoders.images import decode_data_uri, decode_image, open_image, target_size


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


# -- reduced as decoded, memory known before decoding (issue 11: 512 images of 1024x1024 in one
# request held ~2.3 GB, because full-size pictures waited in the batch queue) ---------------------


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


def _noise(size, mode="RGB") -> Image.Image:
    import numpy as np

    bands = len(mode)
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], bands), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(), mode)


def test_target_size_takes_the_shorter_edge_to_the_model_input_size_and_caps_the_longer():
    assert target_size(1024, 768, 64, 1024) == (85, 64)  # int(64 * 1024 / 768), as transformers computes it
    assert target_size(768, 1024, 64, 1024) == (64, 85)
    assert target_size(50, 40, 64, 1024) == (50, 40)  # never enlarged
    assert target_size(40000, 100, 64, 1024) == (1024, 3)  # longer edge capped by max_side
    assert target_size(400, 200, None, 100) == (100, 50)  # no model size: max_side only


def test_memory_is_known_from_the_header_before_decoding():
    pending = open_image(_png(Image.new("RGB", (1024, 1024))), min_side=64, max_side=1024)
    assert pending.size == (64, 64) and pending.held_bytes == 64 * 64 * 3
    assert pending.decode_bytes == 1024 * 1024 * 3 + 64 * 64 * 3  # PNG: full-size pixels, then the small copy
    palette = open_image(_png(Image.new("P", (100, 100))), min_side=64)
    assert palette.decode_bytes == 100 * 100 * (1 + 3) + 64 * 64 * 3  # palette pixels + their RGB conversion


def test_jpeg_is_decoded_at_reduced_scale_and_nothing_full_size_is_kept():
    pending = open_image(_jpeg(_noise((1024, 768))), min_side=64, max_side=1024)
    assert pending.decode_bytes <= 128 * 96 * 3 + 85 * 64 * 3  # DCT scaling 1/8: never 1024 x 768
    image = pending.decode()
    assert image.size == (85, 64) and image.mode == "RGB"
    assert pending.image.size == (1, 1)  # the full-size image (and its bytes) is not referenced any more


def test_reduced_image_gives_the_processor_the_same_pixels():
    """The reduction is the CLIP processor's own resize (bicubic, shorter edge, no reducing gap), so
    its resize of the reduced image is a no-op: the model sees the same pixel values."""
    import numpy as np
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    original = _noise((640, 480))
    reduced = decode_image(_png(original), min_side=64, max_side=1024)
    assert reduced.size == (85, 64)
    full = processor(images=[original], return_tensors="np")["pixel_values"]
    small = processor(images=[reduced], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(small, full, atol=1e-6)

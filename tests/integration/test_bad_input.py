"""Every bad input gets a 4xx in OpenAI's error shape with a message that says what to fix,
and the service stays healthy: the batch worker lives and other requests still succeed."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from tests.helpers import png_data_uri


def _bomb_uri() -> str:
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, "PNG")  # ~ 50 KB declaring 400 M pixels
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


CASES = [
    # (id, json body, status, error code, words the message must contain)
    ("empty list", {"input": []}, 400, "invalid_input", "empty list"),
    ("empty string", {"input": ["ok", ""]}, 400, "invalid_input", "input[1] is an empty string"),
    ("non-string item", {"input": ["ok", {"a": 1}]}, 400, "invalid_input", "must be a string"),
    ("null item", {"input": [None]}, 400, "invalid_input", "must be a string"),
    ("token ids", {"input": [[101, 2023, 102]]}, 400, "invalid_input", "token-id arrays"),
    ("object input", {"input": {"text": "x"}}, 400, "invalid_request_body", "input"),
    ("missing input", {"model": "minilm"}, 400, "invalid_request_body", "input"),
    ("10,000 items", {"input": ["x"] * 10_000}, 400, "too_many_inputs", "10000 items"),
    ("1 MB string", {"input": "a" * 1_000_000}, 400, "input_too_long", "1000000 characters"),
    ("unknown model", {"input": "x", "model": "nope"}, 404, "model_not_found", "no model named 'nope'"),
    ("unknown version", {"input": "x", "model": "minilm/99"}, 404, "model_version_not_found", "no version 99"),
    ("unknown alias", {"input": "x", "model": "minilm@canary"}, 404, "model_version_not_found", "no alias"),
    ("path traversal", {"input": "x", "model": "../../etc"}, 400, "invalid_model_reference", "invalid model name"),
    ("dimensions too large", {"input": "x", "dimensions": 385}, 400, "invalid_dimensions", "between 1 and 384"),
    ("dimensions zero", {"input": "x", "dimensions": 0}, 400, "invalid_dimensions", "between 1 and 384"),
    ("dimensions negative", {"input": "x", "dimensions": -3}, 400, "invalid_dimensions", "between 1 and 384"),
    ("bad encoding format", {"input": "x", "encoding_format": "int8"}, 400, "invalid_request_body", "encoding_format"),
    ("image to text-only model", {"input": png_data_uri()}, 400, "unsupported_modality", "embeds only text"),
    (
        "invalid base64",
        {"input": "data:image/png;base64,!!notbase64!!", "model": "minilm-dual"},
        400,
        "invalid_image",
        "invalid base64",
    ),
    (
        "corrupt image",
        {
            "input": "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode(),
            "model": "minilm-dual",
        },
        400,
        "invalid_image",
        "input[0]",
    ),
    ("decompression bomb", {"input": _bomb_uri(), "model": "minilm-dual"}, 400, "invalid_image", "400000000 pixels"),
    (
        "remote url while disabled",
        {"input": "https://example.com/cat.png", "model": "minilm-dual", "modality": "image"},
        400,
        "remote_images_disabled",
        "data:image",
    ),
    (
        "text forced to image",
        {"input": "just words", "model": "minilm-dual", "modality": "image"},
        400,
        "invalid_input",
        "not an image",
    ),
]


@pytest.mark.parametrize(("body", "status", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_4xx(http, body, status, code, words):
    response = http.post("/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert words in error["message"]
    assert error["type"] == "invalid_request_error"
    assert http.get("/health").json()["status"] == "ok"


def test_wrong_content_type_is_415(http):
    response = http.post("/v1/embeddings", content=b"input=hello", headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    assert "application/json" in response.json()["error"]["message"]


def test_malformed_json_is_400_with_the_error_shape(http):
    response = http.post("/v1/embeddings", content=b'{"input": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request_body"


def test_unknown_route_uses_the_error_shape(http):
    response = http.get("/v1/nothing-here")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_service_still_serves_after_all_bad_inputs(http):
    for _, body, *_ in CASES[:6]:
        http.post("/v1/embeddings", json=body)
    good = http.post("/v1/embeddings", json={"input": ["still alive"]})
    assert good.status_code == 200
    assert http.get("/health").status_code == 200

"""Input validation of service.inputs that needs no model: text and image items."""

from __future__ import annotations

import pytest

from service.errors import ApiError
from service.inputs import check_text, split_inputs
from service.settings import Settings


@pytest.fixture()
def settings(tmp_path):
    return Settings(data_dir=tmp_path, allow_remote_images=True)


@pytest.mark.parametrize("text", ["abc\ud800def", "\udfff", "ok \U0001f600 then \udc00"])
def test_lone_surrogates_are_refused_naming_the_input(settings, text):
    with pytest.raises(ApiError) as refused:
        check_text(text, "items[3].text", settings)
    assert refused.value.status == 400 and refused.value.param == "items[3].text"
    assert refused.value.code == "invalid_text"


@pytest.mark.parametrize("text", ["plain", "caf\u00e9 \U0001f600", "nul\x00inside"])
def test_valid_unicode_and_nul_are_text(settings, text):
    check_text(text, "input[0]", settings)


@pytest.mark.parametrize(
    "item", ["https://example.com/a\ud800.png", "data:image/png;base64,\udc00AAAA"], ids=["url", "data-uri"]
)
def test_lone_surrogate_in_an_image_uri_is_a_400_not_a_500(settings, item):
    with pytest.raises(ApiError) as refused:
        split_inputs([item], "image", settings)
    assert refused.value.status == 400 and refused.value.param == "input[0]"
    assert "surrogate" in refused.value.message

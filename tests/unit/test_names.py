from __future__ import annotations

import pytest

from registry.errors import InvalidNameError
from registry.names import ModelRef, parse_model_ref, validate_alias, validate_name


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("minilm", ModelRef("minilm", alias="production")),
        ("minilm@staging", ModelRef("minilm", alias="staging")),
        ("minilm@latest", ModelRef("minilm", alias="latest")),
        ("minilm/12", ModelRef("minilm", version=12)),
        ("  my.model_v2-x  ", ModelRef("my.model_v2-x", alias="production")),
    ],
)
def test_parse_valid_references(ref, expected):
    assert parse_model_ref(ref) == expected


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "../etc/passwd",
        "..",
        "a/../b",
        "minilm/0",
        "minilm/-1",
        "minilm/1.5",
        "minilm/x",
        "a b",
        "/abs",
        "minilm@",
        "minilm@v2",
        "minilm@../x",
        "mini\\lm",
        "name\x00",
        "x" * 101,
        ".hidden",
    ],
)
def test_parse_rejects_malformed_and_unsafe_references(ref):
    with pytest.raises(InvalidNameError):
        parse_model_ref(ref)


def test_alias_grammar():
    assert validate_alias("production") == "production"
    for bad in ("latest", "v1", "Version3", "1abc", "a/b", "a@b"):
        with pytest.raises(InvalidNameError):
            validate_alias(bad)


def test_name_rejects_double_dot_anywhere():
    with pytest.raises(InvalidNameError):
        validate_name("a..b")

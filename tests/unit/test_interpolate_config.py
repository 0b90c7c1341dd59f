"""The `interpolate` block of the training config (WiSE-FT): what it accepts and what it refuses."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, parse_config

BASE = {
    "base_model": "minilm",
    "train": [{"path": "train.jsonl", "kind": "graded"}],
    "eval": [{"path": "dev.csv", "kind": "graded", "name": "target"}, {"path": "other.csv", "kind": "graded"}],
    "loss": {"name": "cosine"},
    "output": {"name": "tuned"},
}


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"anchor": "a", "positive": "b", "score": 1}\n')
    for name in ("dev.csv", "other.csv", "general.csv"):
        (tmp_path / name).write_text("sentence1,sentence2,score\na,b,1\n")
    return tmp_path


def problems(folder, interpolate, **extra):
    with pytest.raises(ConfigError) as error:
        parse_config({**BASE, **extra, "interpolate": interpolate}, folder)
    return "\n".join(error.value.problems)


def test_a_fixed_alpha_and_auto_with_retain_sets_parse(folder):
    fixed = parse_config({**BASE, "interpolate": {"alpha": 0.3}}, folder).interpolate
    assert fixed is not None and fixed.alpha == 0.3 and fixed.max_retention_drop == 0.5
    auto = parse_config(
        {
            **BASE,
            "interpolate": {
                "alpha": "auto",
                "alphas": [0, 0.5, 1],
                "retain": ["other", {"path": "general.csv", "kind": "graded"}],
                "metric": "target/spearman",
                "max_retention_drop": 1.0,
            },
        },
        folder,
    ).interpolate
    assert auto is not None and auto.alpha == "auto" and auto.alphas == [0, 0.5, 1]
    assert auto.retain[0] == "other" and not isinstance(auto.retain[1], str) and auto.retain[1].path == "general.csv"
    # A fixed alpha may still name retain sets: they are measured and reported.
    assert parse_config({**BASE, "interpolate": {"alpha": 1, "retain": ["other"]}}, folder).interpolate is not None


def test_auto_needs_eval_sets_and_a_retain_set(folder):
    text = problems(folder, {"alpha": "auto"}, eval=[])
    assert "alpha auto needs an evaluation set (eval)" in text
    assert "alpha auto needs interpolate.retain" in text


@pytest.mark.parametrize(
    ("interpolate", "words"),
    [
        ({"alpha": 1.5}, "interpolate.alpha must be in [0, 1]"),
        ({"alpha": -0.1}, "interpolate.alpha must be in [0, 1]"),
        ({"alpha": "auto", "retain": ["other"], "alphas": [0, 1.2]}, "alphas must each be in [0, 1]; remove 1.2"),
        ({"alpha": "auto", "retain": ["other"], "alphas": [0.5, 0.5]}, "lists an alpha twice"),
        ({"alpha": 0.5, "alphas": [0, 1]}, "only used with alpha: auto"),
        ({"alpha": "auto", "retain": ["other"], "metric": "dev/spearman"}, "is not a metric of an eval set"),
        ({"alpha": "auto", "retain": ["other"], "metric": "target/alignment"}, "must be one where higher is better"),
        ({"alpha": "auto", "retain": ["nope"]}, "'nope' is not the name of an eval set (target, other)"),
        ({"alpha": "auto", "retain": ["target"]}, "'target' holds the target metric"),
        ({"alpha": "auto", "retain": ["other", "other"]}, "'other' is listed twice"),
        ({"alpha": "auto", "retain": [{"path": "other.csv"}]}, "is an eval set's; name it by that"),
        ({"alpha": "auto", "retain": [{"path": "missing.csv"}]}, "interpolate.retain[0].path: no such file"),
        ({"alpha": "auto", "retain": ["other"], "max_retention_drop": -1}, "max_retention_drop"),
        ({"alpha": "sometimes"}, "interpolate.alpha"),
    ],
)
def test_bad_interpolate_blocks_name_what_to_change(folder, interpolate, words):
    assert words in problems(folder, interpolate)


def test_the_default_target_is_the_promote_metrics_set(folder):
    promote = {"name": "tuned", "promote": {"alias": "production", "metric": "other/spearman"}}
    # `other` holds the promotion metric, so it is the default target and cannot also be retained.
    assert "'other' holds the target metric" in problems(folder, {"alpha": "auto", "retain": ["other"]}, output=promote)
    assert parse_config({**BASE, "output": promote, "interpolate": {"alpha": "auto", "retain": ["target"]}}, folder)


def test_confined_retain_data_stays_inside_the_datasets_folder(folder):
    """Jobs from the API parse confined: retain data, like train and eval data, only from uploads."""
    for path in ("/etc/passwd", "../x.csv"):
        with pytest.raises(ConfigError) as error:
            parse_config({**BASE, "interpolate": {"alpha": "auto", "retain": [{"path": path}]}}, folder, confined=True)
        assert [p for p in error.value.problems if p.startswith("interpolate.retain[0].path:")] == [
            f"interpolate.retain[0].path: {path!r} must be the path of an uploaded dataset (POST /v1/datasets returns "
            "it), relative and without '..', not a server path"
        ]
    inside = {"alpha": "auto", "retain": [{"path": "general.csv", "kind": "graded"}]}
    assert parse_config({**BASE, "interpolate": inside}, folder, confined=True).interpolate is not None

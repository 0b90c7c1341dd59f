from __future__ import annotations

import json

import pytest

from trainer.config import ConfigError, load_config, parse_config

GOOD = {
    "base_model": "minilm",
    "train": [{"path": "train.jsonl"}],
    "output": {"name": "tuned"},
}


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"anchor": "a", "positive": "b"}\n')
    return tmp_path


def test_a_good_config_parses_with_defaults(folder):
    config = parse_config(GOOD, folder)
    assert config.loss.name == "infonce" and config.batch_size == 64 and config.seed == 42
    assert config.fingerprint() == parse_config(GOOD, folder).fingerprint()


def test_every_problem_is_listed_at_once(folder):
    bad = {
        **GOOD,
        "train": [{"path": "missing.csv", "kind": "graded"}],
        "loss": {"name": "infonce", "cached": True, "mini_batch_size": 500},
        "output": {"name": "../escape", "aliases": ["v2"]},
    }
    with pytest.raises(ConfigError) as error:
        parse_config(bad, folder)
    problems = error.value.problems
    assert len(problems) == 5, problems
    text = "\n".join(problems)
    for words in ("graded data needs loss cosent", "mini_batch_size", "invalid model name", "reserved", "no such file"):
        assert words in text


def test_shape_errors_are_all_reported(folder):
    with pytest.raises(ConfigError) as error:
        parse_config({"train": [], "batch_size": 0, "surprise": True}, folder)
    text = "\n".join(error.value.problems)
    for words in ("base_model", "output", "train", "batch_size", "surprise"):
        assert words in text


def test_yaml_and_json_files_resolve_paths_against_their_folder(folder):
    (folder / "config.json").write_text(json.dumps(GOOD))
    (folder / "config.yaml").write_text("base_model: minilm\ntrain:\n  - path: train.jsonl\noutput:\n  name: tuned\n")
    assert load_config(folder / "config.json") == load_config(folder / "config.yaml")
    (folder / "broken.yaml").write_text("base_model: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(folder / "broken.yaml")


def test_graded_pairs_take_cosent_or_cosine(folder):
    for loss in ("cosent", "cosine"):
        config = parse_config(
            {**GOOD, "train": [{"path": "train.jsonl", "kind": "graded"}], "loss": {"name": loss}}, folder
        )
        assert config.loss.name == loss
    with pytest.raises(ConfigError, match="needs loss cosent, cosine"):
        parse_config(
            {**GOOD, "train": [{"path": "train.jsonl", "kind": "graded"}], "loss": {"name": "sigmoid"}}, folder
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_size", 10**12),
        ("epochs", 1e12),
        ("epochs", float("inf")),
        ("epochs", float("nan")),
        ("max_steps", 2**62),
        ("dataloader_workers", 65),
        ("max_seq_length", 10**9),
        ("learning_rate", float("nan")),
        ("seed", -1),
    ],
)
def test_absurd_and_non_finite_values_are_refused(folder, field, value):
    with pytest.raises(ConfigError) as error:
        parse_config({**GOOD, field: value}, folder)
    assert any(p.startswith(f"{field}:") for p in error.value.problems), error.value.problems


def test_infinity_from_json_text_is_refused(folder):
    data = json.loads('{"epochs": Infinity, "loss": {"temperature": NaN}}')  # Python's json accepts both
    with pytest.raises(ConfigError) as error:
        parse_config({**GOOD, **data}, folder)
    text = "\n".join(error.value.problems)
    assert "epochs" in text and "loss.temperature" in text


@pytest.mark.parametrize("reference", ["~/train.jsonl", "~nobody/train.jsonl", "/etc/passwd", "../x/train.jsonl"])
def test_confined_configs_name_only_files_inside_the_base_folder(folder, reference, monkeypatch):
    inner = folder / "datasets"
    inner.mkdir()
    monkeypatch.setenv("HOME", str(folder))  # `~/train.jsonl` exists there: it must not be reached
    with pytest.raises(ConfigError) as error:
        parse_config({**GOOD, "train": [{"path": reference}]}, inner, confined=True)
    (problem,) = error.value.problems
    assert problem.startswith("train[0].path:") and str(folder) not in problem


def test_a_missing_confined_file_is_named_as_given_and_unconfined_tilde_still_expands(folder, monkeypatch):
    with pytest.raises(ConfigError) as error:
        parse_config({**GOOD, "train": [{"path": "abc/none.jsonl"}]}, folder, confined=True)
    assert error.value.problems == ["train[0].path: no such file 'abc/none.jsonl'"]
    monkeypatch.setenv("HOME", str(folder))
    parse_config({**GOOD, "train": [{"path": "~/train.jsonl"}]}, None)  # `duet train` on one's own files


def _with_loss(folder, loss, kind="pairs", **extra):
    return parse_config({**GOOD, "train": [{"path": "train.jsonl", "kind": kind}], "loss": loss, **extra}, folder)


def test_the_new_losses_fit_their_data_kinds(folder):
    for name in ("hn_nce", "cwcl", "moco"):
        assert _with_loss(folder, {"name": name}).loss.name == name
    assert _with_loss(folder, {"name": "cwcl"}, kind="graded").loss.name == "cwcl"  # scores as soft targets
    assert _with_loss(folder, {"name": "multi_positive"}, kind="multi_positive").loss.name == "multi_positive"
    assert _with_loss(folder, {"name": "moco", "cached": True}).loss.cached
    with pytest.raises(ConfigError, match="multi_positive data needs loss multi_positive, not infonce"):
        _with_loss(folder, {"name": "infonce"}, kind="multi_positive")
    with pytest.raises(ConfigError, match="graded data needs loss cosent, cosine, cwcl, not moco"):
        _with_loss(folder, {"name": "moco"}, kind="graded")


@pytest.mark.parametrize(
    ("loss", "extra", "words"),
    [
        ({"name": "hn_nce", "cached": True}, {}, "loss.cached is available for infonce and moco only, not hn_nce"),
        ({"name": "moco", "matryoshka_dims": [64]}, {}, "matryoshka_dims cannot be used with moco"),
        ({"name": "moco", "queue_size": 16}, {"batch_size": 32}, "queue_size must be at least batch_size"),
        ({"name": "moco", "momentum": 1.0}, {}, "loss.momentum"),
        ({"name": "moco", "false_negative_threshold": 1.5}, {}, "loss.false_negative_threshold"),
        ({"name": "hn_nce", "beta": -1}, {}, "loss.beta"),
        ({"name": "cwcl", "cwcl_reference": "image"}, {}, "loss.cwcl_reference"),
        ({"name": "infonce"}, {"eval": [{"path": "train.jsonl", "kind": "multi_positive"}]}, "eval[0]: multi_pos"),
    ],
)
def test_loss_options_that_cannot_work_are_refused_with_what_to_change(folder, loss, extra, words):
    with pytest.raises(ConfigError) as error:
        _with_loss(folder, loss, **extra)
    assert any(words in problem for problem in error.value.problems), error.value.problems


def test_multi_positive_data_refuses_mining_and_negative_columns(folder):
    bad = {
        **GOOD,
        "train": [{"path": "train.jsonl", "kind": "multi_positive", "negatives": ["hard"]}],
        "loss": {"name": "multi_positive"},
        "mining": {"enabled": True},
    }
    with pytest.raises(ConfigError) as error:
        parse_config(bad, folder)
    text = "\n".join(error.value.problems)
    assert "mining needs pairs, not multi_positive" in text and "takes no negatives" in text


def test_each_loss_name_builds_its_loss(folder, tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    from trainer import losses
    from trainer.losses_factory import build_loss

    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    expected = {
        ("hn_nce", False): losses.HardNegativeNCELoss,
        ("cwcl", False): losses.ContinuouslyWeightedLoss,
        ("multi_positive", False): losses.MultiPositiveInfoNCELoss,
        ("moco", False): losses.MomentumQueueLoss,
        ("moco", True): losses.CachedMomentumQueueLoss,
    }
    for (name, cached), cls in expected.items():
        spec = {"name": name, "cached": cached, "beta": 0.25, "queue_size": 128, "hardest_negatives": 7}
        kind = "multi_positive" if name == "multi_positive" else "pairs"
        loss = build_loss(_with_loss(folder, spec, kind=kind).loss, model)
        assert type(loss) is cls, name
    built = build_loss(_with_loss(folder, {"name": "moco", "queue_size": 128, "hardest_negatives": 7}).loss, model)
    assert built.queue_size == 128 and built.hardest == 7
    assert build_loss(_with_loss(folder, {"name": "hn_nce", "beta": 0.25}).loss, model).beta == 0.25
    cwcl = build_loss(_with_loss(folder, {"name": "cwcl", "cwcl_target_temperature": 0.05}).loss, model)
    assert cwcl.target_temperature == 0.05

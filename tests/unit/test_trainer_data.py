from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from trainer.config import DatasetSpec, MiningSpec
from trainer.data import load_data
from trainer.mining import mine_negatives
from trainer.tables import RowError

SECRET = "root:x:0:0:secret-content-of-a-server-file-that-must-not-leak:/root:/bin/bash"


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_pairs_with_images_load_lazily_and_hash_their_content(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "blue.png")
    rows = [{"text": "a red square", "image": "red.png"}, {"text": "a blue square", "image": "blue.png"}]
    spec = DatasetSpec(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), anchor="text", positive="image")
    data = load_data(spec)
    assert data.modalities == {"anchor": "text", "positive": "image"}
    assert data.rows[0]["positive"].endswith("red.png")  # a path until a batch needs it
    assert data.to_hf()[0]["positive"].getpixel((0, 0)) == (255, 0, 0)
    before = data.sha256
    Image.new("RGB", (8, 8), "green").save(tmp_path / "blue.png")
    assert load_data(spec).sha256 != before  # image bytes are part of the dataset hash


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"anchor": "", "positive": "good.png"}, "d.jsonl:2: column 'anchor' is empty"),
        ({"anchor": "x"}, "d.jsonl:2: column 'positive' is missing (the file's columns: 'anchor')"),
        ({"anchor": "x", "positive": "nope.png"}, "d.jsonl:2: image file not found"),
        ({"anchor": "x", "positive": "broken.png"}, "d.jsonl:2: unreadable image"),
        ({"anchor": "x", "positive": "plain words"}, "d.jsonl:2: column 'positive' holds text here but image"),
    ],
)
def test_bad_rows_name_file_and_line_or_are_skipped(tmp_path, row, words):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.new("RGB", (4, 4)).save(tmp_path / "good.png")
    good = {"anchor": "a", "positive": "good.png"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, row, good])
    with pytest.raises(RowError) as error:
        load_data(DatasetSpec(path=str(path)))
    assert words in str(error.value)
    skipped = load_data(DatasetSpec(path=str(path), skip_bad_rows=True))
    assert len(skipped) == 2 and skipped.skipped == 1


def test_sts_files_become_graded_pairs_scaled_to_one(tmp_path):
    path = tmp_path / "sts-mini.csv"
    path.write_text(
        'main-news\tx\t2012\t1\t5.000\tA "quoted" plane.\tAn air plane.\nmain-news\tx\t2012\t2\t0.0\tA\tB\n'
    )
    data = load_data(DatasetSpec(path=str(path), kind="graded", format="sts"))
    assert data.rows[0] == {"anchor": 'A "quoted" plane.', "positive": "An air plane.", "score": 1.0}
    assert data.rows[1]["score"] == 0.0


def test_texts_become_simcse_pairs(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "two"}])
    data = load_data(DatasetSpec(path=str(path), kind="texts", anchor="text"))
    assert data.columns == ["anchor", "positive"] and data.rows[1] == {"anchor": "two", "positive": "two"}


def test_mining_skips_the_positive_and_likely_false_negatives():
    # Corpus: 0 = the positive, 1 = a near-duplicate of it (false negative), 2 = a hard negative, 3 = easy.
    corpus = np.array([[1, 0], [0.999, 0.045], [0.8, 0.6], [0, 1]], dtype=np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    anchors = corpus[:1].copy()
    negatives, report = mine_negatives(
        anchors, corpus[[0]], corpus, np.array([0]), MiningSpec(negatives_per_anchor=1, false_negative_margin=0.95)
    )
    assert negatives == [[2]]
    assert report.skipped_false_negatives == 1
    loose, _ = mine_negatives(anchors, corpus[[0]], corpus, np.array([0]), MiningSpec(false_negative_margin=1.0))
    assert loose == [[1]]


# -- confined (jobs from the API): nothing outside the datasets folder ---------------------------


@pytest.fixture()
def datasets(tmp_path):
    """A datasets folder, and a server file beside it that a job must never read."""
    root = tmp_path / "datasets"
    (root / "abc").mkdir(parents=True)
    (tmp_path / "secret.csv").write_text(f"anchor,positive,score\na,b,{SECRET}\n")
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    return root


@pytest.mark.parametrize(
    "reference", ["~/secret.csv", "~root/secret.csv", "/etc/passwd", "../secret.csv", "abc/../../secret.csv", "$HOME/x"]
)
def test_confined_references_never_leave_the_datasets_folder(datasets, reference, monkeypatch):
    monkeypatch.setenv("HOME", str(datasets.parent))  # `~` would reach secret.csv if it expanded
    with pytest.raises(RowError) as error:
        load_data(DatasetSpec(path=reference, kind="graded"), datasets, confined=True)
    message = str(error.value)
    assert SECRET[:20] not in message and str(datasets) not in message


def test_confined_links_out_of_the_datasets_folder_are_refused(datasets):
    (datasets / "abc" / "link.csv").symlink_to(datasets.parent / "secret.csv")
    with pytest.raises(RowError, match="outside the uploaded datasets"):
        load_data(DatasetSpec(path="abc/link.csv", kind="graded"), datasets, confined=True)


def test_confined_image_references_stay_inside(datasets):
    rows = [{"anchor": "a", "positive": "../../secret.png"}, {"anchor": "b", "positive": "/tmp/x.png"}]
    write_jsonl(datasets / "abc" / "d.jsonl", rows)
    with pytest.raises(RowError) as error:
        load_data(DatasetSpec(path="abc/d.jsonl"), datasets, confined=True)
    assert "abc/d.jsonl:1: image '../../secret.png' is not inside this upload" in str(error.value)
    assert str(datasets) not in str(error.value)
    # nor into another upload (another key's, perhaps); within its own upload a file may climb
    (datasets / "other").mkdir()
    Image.new("RGB", (4, 4)).save(datasets / "other" / "img.png")
    Image.new("RGB", (4, 4)).save(datasets / "abc" / "img.png")
    write_jsonl(datasets / "abc" / "x.jsonl", [{"anchor": "a", "positive": "../other/img.png"}])
    with pytest.raises(RowError, match="not inside this upload"):
        load_data(DatasetSpec(path="abc/x.jsonl"), datasets, confined=True)
    (datasets / "abc" / "sub").mkdir()
    write_jsonl(datasets / "abc" / "sub" / "ok.jsonl", [{"anchor": "a", "positive": "../img.png"}])
    assert len(load_data(DatasetSpec(path="abc/sub/ok.jsonl"), datasets, confined=True)) == 1


def test_errors_name_the_reference_and_clip_quoted_cells(datasets):
    (datasets / "abc" / "g.csv").write_text(f"anchor,positive,score\na,b,{SECRET}\n")
    with pytest.raises(RowError) as error:
        load_data(DatasetSpec(path="abc/g.csv", kind="graded"), datasets, confined=True)
    message = str(error.value)
    assert message.startswith("abc/g.csv:2: score column 'score' is not a number: 'root:x:0:0:")
    assert SECRET not in message and "chars)" in message and str(datasets) not in message


def test_sts_content_is_recognised_whatever_the_file_is_called(tmp_path):
    path = tmp_path / "my-similarity.csv"  # not named sts-*.csv
    path.write_text("main-news\tx\t2012\t1\t5.000\tA plane.\tAn air plane.\nmain-news\tx\t2012\t2\t0.0\tA\tB\n")
    data = load_data(DatasetSpec(path=str(path), kind="graded"))
    assert data.rows[0] == {"anchor": "A plane.", "positive": "An air plane.", "score": 1.0}


def test_a_missing_column_says_which_setting_or_format_to_use(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("question,answer,label\nq,a,1\n")
    with pytest.raises(RowError) as error:
        load_data(DatasetSpec(path=str(path), kind="graded"))
    message = str(error.value)
    assert "column 'anchor' is missing (the file's columns: 'question', 'answer', 'label')" in message
    assert "'anchor' setting" in message and "format: sts" in message


# -- multi_positive: an anchor with a list of positives -----------------------------------------


def test_multi_positive_rows_spread_into_padded_examples_with_counts(tmp_path):
    Image.new("RGB", (4, 4), "red").save(tmp_path / "red.png")
    rows = [
        {"image": "red.png", "captions": ["a red square", "a small red box", "red on grey"]},
        {"image": "red.png", "captions": "one caption as a plain string"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    spec = DatasetSpec(path=str(path), kind="multi_positive", anchor="image", positive="captions")
    data = load_data(spec)  # K = the most positives a row has (3)
    assert data.columns == ["anchor", "positive_1", "positive_2", "positive_3", "score"]
    assert data.modalities == {"anchor": "image", "positive_1": "text", "positive_2": "text", "positive_3": "text"}
    assert [r["score"] for r in data.rows] == [3.0, 1.0]
    assert data.rows[1]["positive_2"] == data.rows[1]["positive_3"] == "one caption as a plain string"  # padding
    split = load_data(spec.model_copy(update={"max_positives": 2}))  # 3 captions -> 2 examples, nothing dropped
    assert [(r["positive_1"], r["positive_2"], r["score"]) for r in split.rows] == [
        ("a red square", "a small red box", 2.0),
        ("red on grey", "red on grey", 1.0),
        ("one caption as a plain string", "one caption as a plain string", 1.0),
    ]
    assert split.to_hf()[0]["anchor"].getpixel((0, 0)) == (255, 0, 0)


def test_multi_positive_bad_rows_say_what_is_wrong(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"anchor": "a", "positive": ["x"]}, {"anchor": "b", "positive": []}])
    with pytest.raises(RowError, match="m.jsonl:2: column 'positive' holds an empty list"):
        load_data(DatasetSpec(path=str(path), kind="multi_positive"))
    path = write_jsonl(tmp_path / "e.jsonl", [{"anchor": "a", "positive": ["x", " "]}])
    with pytest.raises(RowError, match="e.jsonl:1: column 'positive' is empty"):
        load_data(DatasetSpec(path=str(path), kind="multi_positive"))

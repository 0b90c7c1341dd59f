from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from trainer.config import DatasetSpec, MiningSpec
from trainer.data import load_data
from trainer.mining import mine_negatives
from trainer.tables import RowError


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
        ({"anchor": "x"}, "d.jsonl:2: column 'positive' is empty or missing"),
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

"""The synthetic captioned-images generator: determinism, unseen-combination splits, faithful captions, reuse."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.synthetic import (
    COLOURS,
    MIN_TEST_PER_COMBO,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    SyntheticSpec,
    caption,
    generate,
    held_out_combinations,
    position_centre,
    render,
)

SMALL = SyntheticSpec(image_size=64, n_train=60, n_test=30, seed=3)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synthetic") / "set", SMALL)


def _rows(jsonl: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- reading an image back: what does it actually show? -------------------------------------------


def _nearest_colour(pixel) -> str:
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], pixel)))


def _mask(image: Image.Image, colour: str) -> np.ndarray:
    """Pixels closer to the shape's colour than to the (grey) background."""
    pixels = np.asarray(image, dtype=float)
    background = pixels[0, 0]
    to_fill = np.linalg.norm(pixels - np.array(COLOURS[colour]), axis=2)
    return to_fill < np.linalg.norm(pixels - background, axis=2)


def _normalised_crop(mask: np.ndarray, side: int = 24) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    resized = Image.fromarray(crop.astype(np.uint8) * 255).resize((side, side), Image.BILINEAR)
    return np.asarray(resized) > 127


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def _read_back(image: Image.Image, colour: str) -> tuple[str, str, str]:
    """(shape, size, position) of the `colour` shape: best-matching canonical shape, extent, nearest centre."""
    size = image.size[0]
    mask = _mask(image, colour)
    crop = _normalised_crop(mask)
    templates = {
        shape: _normalised_crop(_mask(render(colour, shape, "large", "centre", size), colour)) for shape in SHAPES
    }
    shape = max(SHAPES, key=lambda s: _iou(crop, templates[s]))
    ys, xs = np.nonzero(mask)
    extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
    size_name = "large" if extent > 0.3 * size else "small"
    centroid = (xs.mean(), ys.mean())
    position = min(POSITIONS, key=lambda p: np.hypot(*np.subtract(position_centre(p, size), centroid)))
    return shape, size_name, position


# --- tests ---------------------------------------------------------------------------------------


def test_layout_counts_and_relative_paths(small_set):
    root = small_set.root
    assert not small_set.reused
    assert (small_set.n_train, small_set.n_test) == (60, 30)
    for split, count in (("train", 60), ("test", 30)):
        rows = _rows(root / f"{split}.jsonl")
        assert len(rows) == count
        assert [r["image"] for r in rows] == [f"images/{split}/{i:05d}.png" for i in range(count)]
        assert len(list((root / "images" / split).glob("*.png"))) == count
        assert all(set(r) == {"image", "text", "colour", "shape", "size", "position"} for r in rows)
    manifest = json.loads(small_set.manifest.read_text())
    assert manifest["counts"]["train"] == 60 and manifest["counts"]["test"] == 30
    assert [tuple(p) for p in manifest["held_out"]] == list(small_set.held_out)
    assert manifest["spec"]["seed"] == 3
    assert set(manifest["sha256"]) == {"train.jsonl", "test.jsonl"}


def test_images_decode_as_rgb_of_the_right_size(tmp_path, small_set):
    for jsonl in (small_set.train_jsonl, small_set.test_jsonl):
        for row in _rows(jsonl)[:10]:
            with Image.open(jsonl.parent / row["image"]) as image:
                image.load()
                assert image.format == "PNG" and image.mode == "RGB" and image.size == (64, 64)
    other = generate(tmp_path / "big", SyntheticSpec(image_size=96, n_train=30, n_test=18, seed=1))
    row = _rows(other.test_jsonl)[0]
    assert Image.open(other.root / row["image"]).size == (96, 96)


def test_test_split_holds_only_unseen_combinations_and_training_covers_every_attribute(small_set):
    train, test = _rows(small_set.train_jsonl), _rows(small_set.test_jsonl)
    train_pairs = {(r["colour"], r["shape"]) for r in train}
    test_pairs = {(r["colour"], r["shape"]) for r in test}
    assert test_pairs == set(small_set.held_out)
    assert not train_pairs & test_pairs
    assert {r["colour"] for r in train} == set(COLOURS)
    assert {r["shape"] for r in train} == set(SHAPES)
    assert len(small_set.held_out) == round(0.2 * len(COLOURS) * len(SHAPES))


def test_each_unseen_combination_has_several_different_test_images(small_set):
    test = _rows(small_set.test_jsonl)
    for pair in small_set.held_out:
        variants = [(r["size"], r["position"]) for r in test if (r["colour"], r["shape"]) == pair]
        assert len(variants) >= MIN_TEST_PER_COMBO
        assert len(set(variants)) == len(variants)  # fewer than 10 each here, so no description repeats


@pytest.mark.parametrize("seed", range(8))
def test_holdouts_always_leave_every_colour_and_shape_in_training(seed):
    spec = SyntheticSpec(n_train=200, n_test=200, seed=seed, holdout_fraction=0.5)
    held = set(held_out_combinations(spec))
    seen = {(c, s) for c in COLOURS for s in SHAPES} - held
    assert len(held) == 15
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)


def test_captions_describe_what_is_drawn(small_set):
    for jsonl in (small_set.train_jsonl, small_set.test_jsonl):
        for row in _rows(jsonl):
            image = Image.open(jsonl.parent / row["image"]).convert("RGB")
            centre = tuple(round(v) for v in position_centre(row["position"], 64))
            assert _nearest_colour(image.getpixel(centre)) == row["colour"], row
            assert _read_back(image, row["colour"]) == (row["shape"], row["size"], row["position"]), row
            text = row["text"]
            assert f"{row['size']} {row['colour']} {row['shape']}" in text
            assert text.endswith(POSITION_PHRASES[row["position"]])


@pytest.mark.parametrize("shape", SHAPES)
def test_render_draws_every_combination_recognisably(shape):
    rng = random.Random(7)
    for colour in COLOURS:
        for size in SIZES:
            for position in POSITIONS:
                image = render(colour, shape, size, position, 64, rng)
                centre = tuple(round(v) for v in position_centre(position, 64))
                assert image.getpixel(centre) == COLOURS[colour]  # interior pixels keep the exact colour
                assert _read_back(image, colour) == (shape, size, position)


def test_caption_templates_and_bad_names():
    assert caption("red", "circle", "small", "left") == "a small red circle on the left"
    assert caption("blue", "square", "large", "top", template=1) == "a photo of a large blue square at the top"
    with pytest.raises(ValueError, match="unknown colour 'mauve'"):
        caption("mauve", "circle", "small", "left")
    with pytest.raises(ValueError, match="unknown shape"):
        render("red", "hexagon", "small", "left")


def test_same_spec_gives_byte_identical_files(tmp_path, small_set):
    again = generate(tmp_path / "again", SMALL)
    assert not again.reused
    assert _files(again.root) == _files(small_set.root)


def test_different_seeds_give_different_data(tmp_path, small_set):
    other = generate(tmp_path / "other", SyntheticSpec(image_size=64, n_train=60, n_test=30, seed=4))
    assert other.train_jsonl.read_bytes() != small_set.train_jsonl.read_bytes()
    image = "images/train/00000.png"
    assert (other.root / image).read_bytes() != (small_set.root / image).read_bytes()


def test_jitter_makes_same_description_images_differ_and_can_be_turned_off():
    a = render("red", "star", "large", "left", 64, random.Random(1))
    b = render("red", "star", "large", "left", 64, random.Random(2))
    assert a.tobytes() != b.tobytes()
    assert render("red", "star", "large", "left").tobytes() == render("red", "star", "large", "left").tobytes()


def test_complete_set_is_reused_without_rewriting(small_set):
    before = {p: p.stat().st_mtime_ns for p in small_set.root.rglob("*")}
    again = generate(small_set.root, SMALL)
    assert again.reused
    assert again.held_out == small_set.held_out and again.train_jsonl == small_set.train_jsonl
    assert {p: p.stat().st_mtime_ns for p in small_set.root.rglob("*")} == before
    assert not [p for p in small_set.root.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_damaged_or_other_spec_sets_are_rebuilt(tmp_path):
    spec = SyntheticSpec(n_train=30, n_test=18, seed=5)
    first = generate(tmp_path / "set", spec)
    good = first.test_jsonl.read_bytes()
    first.test_jsonl.write_text("half a line")
    repaired = generate(tmp_path / "set", spec)
    assert not repaired.reused and repaired.test_jsonl.read_bytes() == good
    changed = generate(tmp_path / "set", SyntheticSpec(n_train=40, n_test=18, seed=5))
    assert not changed.reused and len(_rows(changed.train_jsonl)) == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_foreign_non_empty_folder_is_refused_and_kept(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no synthetic set"):
        generate(tmp_path / "mine", SyntheticSpec(n_train=30, n_test=18))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_empty_existing_folder_is_filled(tmp_path):
    (tmp_path / "empty").mkdir()
    made = generate(tmp_path / "empty", SyntheticSpec(n_train=30, n_test=18))
    assert made.manifest.is_file() and not made.reused


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"holdout_fraction": 0.7}, "holdout_fraction"),
        ({"n_test": 5}, "n_test must be >= 18"),
        ({"n_train": 10}, "n_train must be >= 24"),
        ({"image_size": 8}, "image_size"),
    ],
)
def test_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticSpec(**kwargs)


def test_no_holdout_means_test_shares_training_combinations(tmp_path):
    made = generate(tmp_path / "iid", SyntheticSpec(n_train=30, n_test=12, holdout_fraction=0.0))
    assert made.held_out == ()
    train_pairs = {(r["colour"], r["shape"]) for r in _rows(made.train_jsonl)}
    assert {(r["colour"], r["shape"]) for r in _rows(made.test_jsonl)} <= train_pairs

"""A deterministic synthetic captioned-images set: coloured shapes and the sentences that describe them.

Why it exists: demos, tests and benchmarks of cross-modal (text <-> image) fine-tuning need paired data
that ships with the project (no download, no licence question), is small enough to build in seconds on
a laptop, and has a known ground truth. Every image here is fully described by four attributes
(colour, shape, size, position), so a caption is *exactly* right and a model's mistakes can be named.

The test split holds out a deterministic set of (colour, shape) combinations that training never shows,
while every colour and every shape on its own does appear in training. Retrieval on that split therefore
measures compositional generalisation ("a purple star" after seeing purple things and stars, never a
purple star) instead of memorisation, which is what a fine-tuning demo should be able to show.

Same arguments and seed give byte-identical files (only `random.Random.random()` is used, whose stream
Python guarantees across versions; PNGs carry no timestamps). A set is written into a temporary sibling
folder and renamed into place, so a half-written set is never mistaken for a complete one, and a
complete set for the same spec is reused instead of rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

# Bump when rendering, captions or the split plan change: a set written by another version is rebuilt.
GENERATOR = "trainer.synthetic"
GENERATOR_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Clearly distinct, saturated colours, all far from the light-grey background (and from each other).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (40, 160, 50),
    "blue": (30, 80, 220),
    "yellow": (245, 210, 20),
    "purple": (135, 50, 175),
    "orange": (250, 125, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
T = TypeVar("T")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
# Every template names all four attributes, so any caption fully describes its image.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} {where}",
    "a photo of a {size} {colour} {shape} {where}",
    "an image of a {size} {colour} {shape} {where}",
    "a picture showing a {size} {colour} {shape} {where}",
)

# Shape circumradius as a fraction of the image side; large is ~1.8x small, so sizes never overlap
# even with jitter. Position centres leave room for a jittered large shape inside the frame.
_RADIUS_FRACTION = {"small": 0.12, "large": 0.22}
_CENTRE_FRACTION = {
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "centre": (0.5, 0.5),
}
_BACKGROUND = 240
_BACKGROUND_JITTER = 12
_SCALE_JITTER = 0.08  # relative radius change
_OFFSET_JITTER = 0.12  # centre offset per axis, as a fraction of the radius: the centre stays inside every shape
_SUPERSAMPLE = 4  # draw at 4x and box-reduce: smooth edges, interior pixels keep the exact colour
MIN_TEST_PER_COMBO = 3


class Description(NamedTuple):
    """The four attributes that fully determine what an image shows."""

    colour: str
    shape: str
    size: str
    position: str


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines a synthetic set; equal specs give byte-identical sets.

    `holdout_fraction` of the (colour, shape) pairs (rounded, at least one when > 0) appear only in the
    test split; with 0 the test split is an ordinary sample of the same combinations as training.
    `jitter` adds seed-driven position offsets, slight size changes and background shades, so images
    with the same description differ a little; `varied_captions` picks one of `CAPTION_TEMPLATES` per
    image instead of always the first. Small shapes are about a quarter of `image_size` wide: from 64 px
    up every shape is unambiguous, at 32 px small ones are only a few pixels across.
    """

    image_size: int = 64
    n_train: int = 2000
    n_test: int = 500
    seed: int = 0
    holdout_fraction: float = 0.2
    jitter: bool = True
    varied_captions: bool = True

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ValueError("invalid SyntheticSpec: " + "; ".join(problems))

    def _problems(self) -> Iterator[str]:
        if self.image_size < 32:
            yield f"image_size must be >= 32 (got {self.image_size}) for small shapes to stay recognisable"
        if not 0.0 <= self.holdout_fraction <= 0.5:
            yield f"holdout_fraction must be in [0, 0.5] (got {self.holdout_fraction})"
            return
        n_held = held_out_count(self.holdout_fraction)
        n_seen = len(COLOURS) * len(SHAPES) - n_held
        if self.n_train < n_seen:
            yield f"n_train must be >= {n_seen} so every training combination (and so every colour and shape) appears"
        if n_held and self.n_test < MIN_TEST_PER_COMBO * n_held:
            yield (
                f"n_test must be >= {MIN_TEST_PER_COMBO * n_held}: {MIN_TEST_PER_COMBO} images for each of the "
                f"{n_held} held-out combinations, so retrieval on unseen combinations is meaningful"
            )
        elif self.n_test < 1:
            yield "n_test must be >= 1"


@dataclass(frozen=True)
class SyntheticSet:
    """A complete set on disk: where its files are, how many rows, and which combinations are unseen."""

    root: Path
    train_jsonl: Path
    test_jsonl: Path
    manifest: Path
    n_train: int
    n_test: int
    held_out: tuple[tuple[str, str], ...]
    reused: bool = False


# --- rendering and captions ---------------------------------------------------------------------


def position_centre(position: str, image_size: int) -> tuple[float, float]:
    """The un-jittered centre (x, y) in pixels of a shape at `position`; jitter moves it by < 15% of the radius."""
    fx, fy = _CENTRE_FRACTION[_check(position, POSITIONS, "position")]
    return fx * image_size, fy * image_size


def render(
    colour: str,
    shape: str,
    size: str,
    position: str,
    image_size: int = 64,
    rng: random.Random | None = None,
) -> Image.Image:
    """Draw one shape on a plain light-grey background, as a `image_size` x `image_size` RGB image.

    With `rng`, the background shade, the radius and the centre vary a little (drawn from `rng` in a
    fixed order, so the same generator state gives the same pixels); without it the image is canonical.
    The shape's centre pixel always has exactly the colour's RGB value.
    """
    fill = COLOURS[_check(colour, tuple(COLOURS), "colour")]
    _check(shape, SHAPES, "shape")
    radius = _RADIUS_FRACTION[_check(size, SIZES, "size")] * image_size
    cx, cy = position_centre(position, image_size)
    background = _BACKGROUND
    if rng is not None:
        background += round(_uniform(rng, -_BACKGROUND_JITTER, _BACKGROUND_JITTER))
        radius *= 1 + _uniform(rng, -_SCALE_JITTER, _SCALE_JITTER)
        cx += _uniform(rng, -_OFFSET_JITTER, _OFFSET_JITTER) * radius
        cy += _uniform(rng, -_OFFSET_JITTER, _OFFSET_JITTER) * radius
    side = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    s = _SUPERSAMPLE
    _draw_shape(draw, shape, cx * s, cy * s, radius * s, fill)
    return canvas.reduce(s)


def caption(colour: str, shape: str, size: str, position: str, template: int = 0) -> str:
    """The sentence for an image: `CAPTION_TEMPLATES[template]` filled with the four attributes."""
    return CAPTION_TEMPLATES[template % len(CAPTION_TEMPLATES)].format(
        size=_check(size, SIZES, "size"),
        colour=_check(colour, tuple(COLOURS), "colour"),
        shape=_check(shape, SHAPES, "shape"),
        where=POSITION_PHRASES[_check(position, POSITIONS, "position")],
    )


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, ...]) -> None:
    """Shapes are sized by circumradius `r`, scaled so their areas look alike; all point up."""
    if shape == "circle":
        rr = 0.92 * r
        draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=fill)
    elif shape == "square":
        h = 0.8 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon(_star_points(cx, cy, r, r, 3), fill=fill)
    elif shape == "star":
        draw.polygon(_star_points(cx, cy, r, 0.5 * r, 5), fill=fill)
    else:  # cross: a plus sign
        arm, half = 0.9 * r, 0.3 * r
        draw.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=fill)
        draw.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=fill)


def _star_points(cx: float, cy: float, outer: float, inner: float, points: int) -> list[tuple[float, float]]:
    """Vertices of a star with `points` tips (a regular polygon when inner == outer), first tip straight up."""
    radii = [outer] if inner == outer else [outer, inner]
    count = points * len(radii)
    return [
        (cx + radii[k % len(radii)] * math.cos(angle), cy + radii[k % len(radii)] * math.sin(angle))
        for k in range(count)
        for angle in [-math.pi / 2 + 2 * math.pi * k / count]
    ]


# --- the split plan -----------------------------------------------------------------------------


def held_out_count(holdout_fraction: float) -> int:
    """How many (colour, shape) pairs a fraction holds out: rounded, and at least one when it is > 0."""
    n = round(holdout_fraction * len(COLOURS) * len(SHAPES))
    return max(n, 1) if holdout_fraction > 0 else 0


def held_out_combinations(spec: SyntheticSpec) -> tuple[tuple[str, str], ...]:
    """The (colour, shape) pairs only the test split shows, sorted; a function of the seed and fraction.

    Picked greedily from a seeded shuffle, always taking a pair whose colour and shape are held out the
    fewest times so far, and never the last training pair of a colour or a shape: the holdouts spread
    over all colours and shapes, and every colour and every shape keeps appearing in training.
    """
    rng = random.Random(_derive_seed(spec.seed, "holdout"))
    candidates = _shuffled(rng, [(c, s) for c in COLOURS for s in SHAPES])
    held: list[tuple[str, str]] = []
    for _ in range(held_out_count(spec.holdout_fraction)):
        pick = _next_holdout(candidates, held)
        held.append(pick)
        candidates.remove(pick)
    return tuple(sorted(held))


def _next_holdout(candidates: list[tuple[str, str]], held: list[tuple[str, str]]) -> tuple[str, str]:
    def load(pair: tuple[str, str]) -> int:
        return sum(h[0] == pair[0] for h in held) + sum(h[1] == pair[1] for h in held)

    def keeps_training_cover(pair: tuple[str, str]) -> bool:
        same_colour = sum(c[0] == pair[0] for c in candidates)
        same_shape = sum(c[1] == pair[1] for c in candidates)
        return same_colour > 1 and same_shape > 1

    allowed = [pair for pair in candidates if keeps_training_cover(pair)]
    if not allowed:  # unreachable for fractions <= 0.5, kept as a clear failure
        raise ValueError("cannot hold out more combinations and keep every colour and shape in training")
    return min(allowed, key=load)  # min keeps the first of equals: the seeded order breaks ties


def plan(spec: SyntheticSpec) -> dict[str, list[Description]]:
    """What each split's images show, in row order.

    Stratified, so counts are balanced: combinations take turns (each gets floor or ceil of n / k
    images), and each combination walks through a shuffled cycle of its 10 size x position variants
    before repeating one, so the test split holds several *different* images of every held-out
    combination. The final order is shuffled so row ids carry no structure.
    """
    held = set(held_out_combinations(spec))
    all_pairs = [(c, s) for c in COLOURS for s in SHAPES]
    seen = [pair for pair in all_pairs if pair not in held]
    unseen = [pair for pair in all_pairs if pair in held] or all_pairs
    return {
        "train": _stratified(seen, spec.n_train, random.Random(_derive_seed(spec.seed, "plan:train"))),
        "test": _stratified(unseen, spec.n_test, random.Random(_derive_seed(spec.seed, "plan:test"))),
    }


def _stratified(pairs: Sequence[tuple[str, str]], n: int, rng: random.Random) -> list[Description]:
    variants = [(size, position) for size in SIZES for position in POSITIONS]
    cycles: dict[tuple[str, str], list[tuple[str, str]]] = {pair: [] for pair in pairs}
    rows: list[Description] = []
    while len(rows) < n:
        for pair in _shuffled(rng, list(pairs)):
            if not cycles[pair]:
                cycles[pair] = _shuffled(rng, list(variants))
            size, position = cycles[pair].pop()
            rows.append(Description(pair[0], pair[1], size, position))
            if len(rows) == n:
                break
    return _shuffled(rng, rows)


# --- writing ------------------------------------------------------------------------------------


def generate(out_dir: Path, spec: SyntheticSpec = SyntheticSpec()) -> SyntheticSet:
    """Write the set described by `spec` to `out_dir` (or reuse it if it is already there) and describe it.

    Layout: `images/{train,test}/NNNNN.png`, `train.jsonl` and `test.jsonl` (one row per image, image
    paths relative to the jsonl's folder), and `manifest.json` (spec, held-out combinations, counts,
    sha256 of each jsonl). Files are written to a temporary sibling folder that is renamed into place,
    so `out_dir` either holds a complete set or nothing. A set in `out_dir` written by this generator for
    another spec (or damaged) is replaced; a folder with anything else in it is refused, never deleted.
    """
    out_dir = Path(out_dir)
    existing = _complete_set(out_dir, spec)
    if existing is not None:
        logger.info("synthetic set in %s matches the spec; reusing it", out_dir)
        return existing
    _refuse_foreign(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_set(staging, spec)
        return _move_into_place(staging, out_dir, spec)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_set(root: Path, spec: SyntheticSpec) -> None:
    splits = plan(spec)
    digests: dict[str, str] = {}
    image_digests: dict[str, str] = {}
    for split, rows in splits.items():
        (root / "images" / split).mkdir(parents=True)
        jsonl, image_digests[split] = _write_split(root, split, rows, spec)
        digests[f"{split}.jsonl"] = hashlib.sha256(jsonl).hexdigest()
    manifest = _manifest(spec, held_out_combinations(spec), digests, image_digests, len(set(splits["test"])))
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _write_split(root: Path, split: str, rows: list[Description], spec: SyntheticSpec) -> tuple[bytes, str]:
    """Render, encode and write one split's images and its jsonl; returns the jsonl bytes and an images digest."""
    lines = []
    images_hash = hashlib.sha256()
    for index, desc in enumerate(rows):
        rng = random.Random(_derive_seed(spec.seed, f"image:{split}:{index}"))
        image = render(*desc, image_size=spec.image_size, rng=rng if spec.jitter else None)
        template = _randbelow(rng, len(CAPTION_TEMPLATES)) if spec.varied_captions else 0
        relative = f"images/{split}/{index:05d}.png"
        data = _png_bytes(image)
        (root / relative).write_bytes(data)
        images_hash.update(hashlib.sha256(data).digest())
        row = {"image": relative, "text": caption(*desc, template=template), **desc._asdict()}
        lines.append(json.dumps(row, ensure_ascii=False))
    jsonl = ("\n".join(lines) + "\n").encode("utf-8")
    (root / f"{split}.jsonl").write_bytes(jsonl)
    return jsonl, images_hash.hexdigest()


def _manifest(
    spec: SyntheticSpec,
    held: tuple[tuple[str, str], ...],
    digests: dict[str, str],
    image_digests: dict[str, str],
    test_descriptions: int,
) -> dict[str, Any]:
    return {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "spec": asdict(spec),
        "vocabulary": {
            "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
            "shapes": list(SHAPES),
            "sizes": list(SIZES),
            "positions": list(POSITIONS),
        },
        "held_out": [list(pair) for pair in held],
        "counts": {"train": spec.n_train, "test": spec.n_test, "test_distinct_descriptions": test_descriptions},
        "sha256": digests,
        "images_sha256": image_digests,
    }


def _move_into_place(staging: Path, out_dir: Path, spec: SyntheticSpec) -> SyntheticSet:
    """Rename the finished staging folder to `out_dir`, replacing an old set of ours if there is one."""
    raced = _complete_set(out_dir, spec)  # another process may have finished the same set meanwhile
    if raced is not None:
        return raced
    previous = None
    if out_dir.exists() and any(out_dir.iterdir()):
        previous = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        logger.warning("replacing the synthetic set in %s (other spec, version or damaged)", out_dir)
        out_dir.rename(previous)
    try:
        os.replace(staging, out_dir)  # atomic; succeeds over an empty folder
    except OSError:
        raced = _complete_set(out_dir, spec)  # another process finished the same set first
        if raced is not None:
            return raced
        if previous is not None and not out_dir.exists():
            previous.rename(out_dir)  # leave things as they were
        raise
    finally:
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    logger.info("wrote synthetic set to %s (%d train, %d test images)", out_dir, spec.n_train, spec.n_test)
    return _describe(out_dir, spec, reused=False)


def _complete_set(out_dir: Path, spec: SyntheticSpec) -> SyntheticSet | None:
    """The set in `out_dir` if its manifest matches `spec` and its jsonl files and images are all there."""
    manifest = _read_manifest(out_dir)
    if manifest is None or manifest.get("generator_version") != GENERATOR_VERSION:
        return None
    if manifest.get("spec") != json.loads(json.dumps(asdict(spec))):
        return None
    for split, count in (("train", spec.n_train), ("test", spec.n_test)):
        jsonl = out_dir / f"{split}.jsonl"
        expected = (manifest.get("sha256") or {}).get(jsonl.name)
        if not jsonl.is_file() or hashlib.sha256(jsonl.read_bytes()).hexdigest() != expected:
            return None
        if sum(1 for _ in (out_dir / "images" / split).glob("*.png")) != count:
            return None
    return _describe(out_dir, spec, reused=True)


def _refuse_foreign(out_dir: Path) -> None:
    """A non-empty `out_dir` that is not a set of ours may hold someone's data: never replace it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and _read_manifest(out_dir) is None:
        raise FileExistsError(f"{out_dir} is not empty and holds no synthetic set; choose another folder")


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("generator") == GENERATOR else None


def _describe(out_dir: Path, spec: SyntheticSpec, reused: bool) -> SyntheticSet:
    return SyntheticSet(
        root=out_dir,
        train_jsonl=out_dir / "train.jsonl",
        test_jsonl=out_dir / "test.jsonl",
        manifest=out_dir / MANIFEST_NAME,
        n_train=spec.n_train,
        n_test=spec.n_test,
        held_out=held_out_combinations(spec),
        reused=reused,
    )


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)  # no metadata, fixed level: same pixels, same bytes
    return buffer.getvalue()


# --- randomness: only Random.random(), whose stream Python keeps stable across versions ---------


def _derive_seed(seed: int, purpose: str) -> int:
    """Independent, reproducible streams per purpose (and per image, so images need no shared state)."""
    digest = hashlib.sha256(f"duet-synthetic:{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _uniform(rng: random.Random, low: float, high: float) -> float:
    return low + (high - low) * rng.random()


def _randbelow(rng: random.Random, n: int) -> int:
    return min(int(rng.random() * n), n - 1)


def _shuffled(rng: random.Random, items: list[T]) -> list[T]:
    """Fisher-Yates on `Random.random()` (`random.shuffle`'s algorithm is not promised to stay the same)."""
    for i in range(len(items) - 1, 0, -1):
        j = _randbelow(rng, i + 1)
        items[i], items[j] = items[j], items[i]
    return items


def _check(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")
    return value

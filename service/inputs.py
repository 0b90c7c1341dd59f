"""Turn the `input` of an embeddings request into validated text and image items.

All checks that can fail because of what the client sent happen here, before anything is
queued, so a bad input is a 4xx naming the offending index and never reaches a batch.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from encoders.contract import Modality, VectorContract
from encoders.errors import ImageDecodeError
from encoders.images import PendingImage, decode_data_uri, is_image_data_uri, open_image
from service.errors import ApiError
from service.limits import memory_budget, return_freed_memory
from service.settings import Settings

ModalityHint = Literal["auto", "text", "image"]
# Below this many characters in a request, tokenising on the event loop is cheaper than a
# thread hop; above it, it would stall other requests.
_INLINE_CHARS = 20_000
# Return freed heap pages to the system after decoding images that needed this much at once.
_TRIM_AFTER_BYTES = 32 * 1024 * 1024
# UTF-16 surrogate code points: JSON may spell them (`"\\ud800"`), but alone they are no
# character, cannot be encoded as UTF-8, and the Rust tokenizer refuses them.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class ModalityGroup:
    """The inputs of one modality, with their positions in the request."""

    indices: list[int] = field(default_factory=list)
    payloads: list[Any] = field(default_factory=list)
    costs: list[int] = field(default_factory=list)


@dataclass
class PreparedInputs:
    count: int
    groups: dict[Modality, ModalityGroup]
    tokens: list[int]
    truncated: list[bool]
    labels: list[str]  # how error messages name each input: "input[3]", "items[7].image"
    # Gives the memory budget back what the decoded images hold; runs once, at the latest when
    # this object is collected (embed_prepared calls it as soon as the vectors are back).
    release_images: weakref.finalize | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(self.tokens)

    def release(self) -> None:
        if self.release_images is not None:
            self.release_images()


def _bad(message: str, index: int | None = None, code: str = "invalid_input") -> ApiError:
    param = "input" if index is None else f"input[{index}]"
    return ApiError(400, message, code=code, param=param)


def split_inputs(raw: Any, hint: ModalityHint, settings: Settings) -> list[tuple[Modality, str]]:
    """Validate shapes and sizes; decide each item's modality. No decoding yet."""
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list):
        raise _bad("input must be a string or a list of strings")
    if not items:
        raise _bad("input is an empty list; send at least one string")
    if len(items) > settings.max_inputs_per_request:
        raise _bad(
            f"input has {len(items)} items; at most {settings.max_inputs_per_request} per request "
            "(DUET_MAX_INPUTS_PER_REQUEST): split it into several requests",
            code="too_many_inputs",
        )
    result: list[tuple[Modality, str]] = []
    for index, item in enumerate(items):
        if isinstance(item, (int, list)) and not isinstance(item, bool):
            raise _bad(
                "token-id arrays are not supported: send the text itself (tokenisation happens on "
                "the server with the model's own tokenizer)",
                index,
            )
        if not isinstance(item, str):
            raise _bad(
                f"input[{index}] must be a string (text or data:image/... URI), got {type(item).__name__}", index
            )
        result.append((_modality_of(item, hint, index, settings), item))
    return result


def check_text(text: str, label: str, settings: Settings) -> None:
    """Refuse empty text and text over the character cap (text under it is truncated, not refused)."""
    if text == "":
        raise ApiError(
            400, f"{label} is an empty string; remove it or send some text", code="invalid_input", param=label
        )
    if len(text) > settings.max_input_chars:
        raise ApiError(
            400,
            f"{label} has {len(text)} characters; the limit is {settings.max_input_chars} "
            "(DUET_MAX_INPUT_CHARS). Text under the limit but over the model's token limit is "
            "truncated, not refused: send a shorter excerpt",
            code="input_too_long",
            param=label,
        )
    if not text.isascii():
        surrogate = _SURROGATE.search(text)
        if surrogate is not None:
            raise ApiError(
                400,
                f"{label} holds a lone UTF-16 surrogate (U+{ord(surrogate.group()):04X}) at character "
                f"{surrogate.start()}, which is not a Unicode character: send valid UTF-8 text (in JSON, "
                "a surrogate escape must be part of a high+low pair)",
                code="invalid_text",
                param=label,
            )


def _modality_of(item: str, hint: ModalityHint, index: int, settings: Settings) -> Modality:
    is_url = item.startswith(("http://", "https://"))
    if hint == "text" or (hint == "auto" and not is_image_data_uri(item)):
        check_text(item, f"input[{index}]", settings)
        return "text"
    if not (is_image_data_uri(item) or is_url):
        raise _bad(
            f"input[{index}] is not an image: with modality 'image' send 'data:image/<type>;base64,...' URIs",
            index,
        )
    if _SURROGATE.search(item) is not None:
        raise _bad(f"input[{index}] holds a lone UTF-16 surrogate, which no image URI may hold", index)
    if is_url and not settings.allow_remote_images:
        raise _bad(
            f"input[{index}] is a URL, and fetching remote images is off (DUET_ALLOW_REMOTE_IMAGES); "
            "send the image inline as a data:image/...;base64 URI",
            index,
            code="remote_images_disabled",
        )
    return "image"


def check_modalities(
    items: list[tuple[Modality, str]], contract: VectorContract, model_ref: str, labels: list[str] | None = None
) -> None:
    for index, (modality, _) in enumerate(items):
        if not contract.accepts(modality):
            name = labels[index] if labels else f"input[{index}]"
            raise ApiError(
                400,
                f"{name} is {'an image' if modality == 'image' else 'text'}, but model {model_ref} embeds only "
                f"{', '.join(contract.modalities)}; use a text+image model such as minilm-dual",
                code="unsupported_modality",
                param=name,
            )


async def prepare(
    items: list[tuple[Modality, str]], encoder: Any, settings: Settings, labels: list[str] | None = None
) -> PreparedInputs:
    """Tokenise texts (for counts and truncation flags) and decode images."""
    labels = labels or [f"input[{i}]" for i in range(len(items))]
    groups: dict[Modality, ModalityGroup] = {}
    for index, (modality, value) in enumerate(items):
        group = groups.setdefault(modality, ModalityGroup())
        group.indices.append(index)
        group.payloads.append(value)
    tokens = [0] * len(items)
    truncated = [False] * len(items)
    if "text" in groups:
        texts = groups["text"]
        if sum(len(t) for t in texts.payloads) <= _INLINE_CHARS:
            counts = encoder.count_tokens(texts.payloads)
        else:
            counts = await anyio.to_thread.run_sync(encoder.count_tokens, texts.payloads)
        texts.costs = [n for n, _ in counts]
        for index, (n, cut) in zip(texts.indices, counts):
            tokens[index], truncated[index] = n, cut
    prepared = PreparedInputs(count=len(items), groups=groups, tokens=tokens, truncated=truncated, labels=labels)
    if "image" in groups:
        images = groups["image"]
        names = [labels[i] for i in images.indices]
        min_side = getattr(getattr(encoder, "contract", None), "image_size", None)
        pending = await anyio.to_thread.run_sync(_open_all, names, images.payloads, settings, min_side)
        held = _reserve_image_memory(pending, settings)
        budget = memory_budget(settings.max_image_memory_bytes)
        # From here the images' memory is released whatever happens: the transient part when
        # decoding ends, the rest with `prepared` (explicitly, or when it is collected).
        prepared.release_images = weakref.finalize(prepared, budget.release, held)
        try:
            images.payloads = await anyio.to_thread.run_sync(_decode_all, names, pending)
        except BaseException:
            prepared.release()
            raise
        finally:
            budget.release(_peak_bytes(pending) - held)
        images.costs = [1] * len(images.payloads)
    return prepared


def _open_all(names: list[str], values: list[str], settings: Settings, min_side: int | None) -> list[PendingImage]:
    """Every image's bytes and checked header, nothing decoded: what they will need is known."""
    opened = []
    for name, value in zip(names, values):
        try:
            data = _fetch(value, settings) if not is_image_data_uri(value) else decode_data_uri(value)
            opened.append(
                open_image(
                    data, max_pixels=settings.max_image_pixels, min_side=min_side, max_side=settings.max_image_side
                )
            )
        except ImageDecodeError as exc:
            raise ApiError(400, f"{name}: {exc}", code="invalid_image", param=name) from None
    return opened


def _peak_bytes(pending: list[PendingImage]) -> int:
    """Most memory the request's images hold at once: decoded one at a time, each decode holds its
    full-size pixels beside the reduced images decoded before it."""
    return max(p.decode_bytes - p.held_bytes for p in pending) + sum(p.held_bytes for p in pending)


def _reserve_image_memory(pending: list[PendingImage], settings: Settings) -> int:
    """Reserve the request's peak image memory before decoding; the bytes it keeps after decoding."""
    memory_budget(settings.max_image_memory_bytes).claim(_peak_bytes(pending))  # 413 never / 429 not now
    return sum(p.held_bytes for p in pending)


def _decode_all(names: list[str], pending: list[PendingImage]) -> list[Any]:
    decoded = []
    try:
        for name, image in zip(names, pending):
            try:
                decoded.append(image.decode())
            except ImageDecodeError as exc:
                raise ApiError(400, f"{name}: {exc}", code="invalid_image", param=name) from None
    finally:
        if _peak_bytes(pending) >= _TRIM_AFTER_BYTES:
            return_freed_memory()
    return decoded


def _fetch(url: str, settings: Settings) -> bytes:
    """Download an image URL within a size and time limit (only when remote images are allowed)."""
    import httpx

    limit = settings.remote_image_max_bytes
    try:
        with httpx.stream("GET", url, timeout=settings.remote_image_timeout_seconds, follow_redirects=False) as r:
            if r.status_code != 200:
                raise ImageDecodeError(f"fetching {url} answered HTTP {r.status_code}")
            chunks, size = [], 0
            for chunk in r.iter_bytes():
                size += len(chunk)
                if size > limit:
                    raise ImageDecodeError(f"image at {url} is larger than {limit} bytes")
                chunks.append(chunk)
    except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as exc:
        raise ImageDecodeError(f"cannot fetch {url!r}: {exc}") from None
    return b"".join(chunks)

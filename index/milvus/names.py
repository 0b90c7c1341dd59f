"""Milvus names for Duet collections.

Milvus names are letters, digits and `_` (starting with a letter or `_`, at most 255 characters);
Duet names are letters, digits, `_` and `-` (starting with a letter or digit, at most 100). A name
is encoded reversibly and without collisions: `_` -> `_u`, `-` -> `_h`, so in an encoded name every
`_` is followed by `u` or `h`, and the separators below (`_g<n>`, the meta collection's `__meta`)
can never occur inside one.

- physical collection of generation n: `{prefix}_{encoded}_g{n}`
- alias naming the current generation:  `{prefix}_{encoded}`
- the backend's metadata:                `{prefix}__meta`
"""

from __future__ import annotations

import re

from index.config import validate_collection_name

# No '_' in a prefix: with one, prefix "p" + name "1_y" and prefix "p_1" + name "uy" made one Milvus name.
# Letters and digits only, the first '_' after the prefix is always the separator.
PREFIX_PATTERN = r"[A-Za-z][A-Za-z0-9]{0,39}"  # unanchored: service/settings.py states it for DUET_MILVUS_PREFIX
PREFIX = re.compile(rf"^{PREFIX_PATTERN}\Z")


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not PREFIX.match(prefix):
        raise ValueError(f"invalid Milvus collection prefix {prefix!r}: 1-40 letters or digits, starting with a letter")
    return prefix


def encode(name: str) -> str:
    validate_collection_name(name)
    return name.replace("_", "_u").replace("-", "_h")


def decode(encoded: str) -> str:
    return re.sub(r"_([uh])", lambda m: "_" if m.group(1) == "u" else "-", encoded)


def alias(prefix: str, name: str) -> str:
    return f"{prefix}_{encode(name)}"


def physical(prefix: str, name: str, generation: int) -> str:
    return f"{prefix}_{encode(name)}_g{int(generation)}"


def generation_of(prefix: str, name: str, collection: str) -> int | None:
    """The generation of a physical collection of `name`, or None if `collection` is not one."""
    match = re.fullmatch(re.escape(f"{prefix}_{encode(name)}_g") + r"(\d+)", collection)
    return int(match.group(1)) if match else None


def meta(prefix: str) -> str:
    return f"{prefix}__meta"

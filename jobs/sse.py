"""The job event stream's wire format (server-sent events), written and read in one place.

The service writes it (`GET /v1/jobs/{id}/events`); the tests, the fault script and the
end-to-end demo read it. Keeping both directions here keeps them in step.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


def encode_event(seq: int | None, kind: str, data: Any) -> bytes:
    """One event: `id:` (when it has one, for Last-Event-ID), `event:`, one JSON `data:` line."""
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def parse_events(lines: Iterable[str]) -> Iterator[tuple[int | None, str | None, Any]]:
    """(id, event, data) for each event in a stream's lines; comments and `retry:` are skipped."""
    seq: int | None = None
    kind: str | None = None
    for line in lines:
        if line.startswith("id: "):
            seq = int(line[4:])
        elif line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            yield seq, kind, json.loads(line[6:])
            seq, kind = None, None

"""Crash test for collections: every acknowledged write survives `kill -9`, nothing is half-present.

Why it exists: a 200 reply to `PUT /v1/collections/{name}/items` (or to `.../items/delete`)
promises the write is durable: committed to the collection's SQLite store (WAL,
synchronous=FULL) before the reply. The FAISS index is only a cache, snapshotted now and then
and replayed forward from the store on start. This script checks that promise the hard way:
it keeps a vector-only collection under concurrent writes, SIGKILLs the whole server process
group at a random moment (with snapshots every second, some kills land mid-snapshot), restarts
it on the same data dir and compares everything the server holds with what it acknowledged.

How to run (from the repository root; stdlib + numpy + httpx, no model is loaded):

    python bench/crash_test.py                  # 20 rounds + 2 corrupt-snapshot rounds, ~3-4 min on 2 cores
    python bench/crash_test.py --rounds 3       # smoke run
    python bench/crash_test.py --metric dot     # raw vectors are stored as sent (checked bit for bit)
    python bench/crash_test.py --seed 7 --keep  # reproducible op stream, keep the data dir afterwards

Each round, `--threads` writers upsert batches of 1-50 random 64-d vectors (fresh ids, overwrites
of live ids, sometimes a batch with a repeated id where the last item must win) and delete
batches of ids, with payloads `{"round", "thread", "batch", "n", "digest"}` (digest: sha256 of
the vector bytes as sent). Each writer owns its own ids, so the order of writes to one id is the
writer's program order and "the last acknowledged state" of every id is exact. A write that was
sent but not answered when the server died is "in flight". After the kill and a restart (with
`--startup-kill-prob`, the first restart is itself killed at a random moment) the checks are:

- lost:          every acknowledged upsert is present with exactly its payload and vector
                 (cosine: the unit-normalised vector; dot: the very bits sent), checked by
                 paging through all items (cursor pagination) and by single GETs on a sample;
- resurrected:   every acknowledged delete is absent (404 on GET as well);
- half-present:  each in-flight batch is all-or-nothing: either every item it changes shows
                 the new value or every one still shows its last acknowledged state;
- torn:          an in-flight item shows one of those two states, never a third;
- phantom:       no id exists that was never written;
- count/index:   the collection count equals the number of live ids, the FAISS index holds
                 exactly that many vectors, and the store's seq is not behind any reply;
- search:        every live item is its own nearest neighbour (score ~1, batched vector
                 queries), and `{"query": {"id": ...}, "k": 5}` returns live neighbours only;
- server:        no 5xx, no unexpected status, the server restarts and becomes ready in time.

With `--corrupt-snapshot` (default on), two last rounds overwrite
`DATA/collections/<name>/index.snapshot` after the kill, with random garbage and with a
truncated copy of itself; the server must rebuild the index from the store, pass the same
checks and write a good snapshot again.

With `--backend milvus`, the collection lives in Milvus: the test starts a `milvus-lite server`
(a real Milvus gRPC server; its data dir beside the server's) and runs `duet serve` with
DUET_COLLECTIONS_BACKEND=milvus on it. A 200 then promises that Milvus acknowledged the write
(and that a read after it sees it: Strong consistency); kills of `duet serve` must lose nothing,
exactly as for faiss. There is no snapshot and no per-collection store seq on this backend, so the
snapshot rounds, mid-snapshot kills and the index/seq count checks are off (the reply's seq, a
per-process timestamp, must still not go backwards within a round). `--milvus-kill-prob P` also
SIGKILLs the milvus-lite server itself at a fraction P of the kills (then restarts it on the
same data dir): that checks milvus-lite's own durability, not Duet's.

    python bench/crash_test.py --backend milvus                      # kills of duet serve
    python bench/crash_test.py --backend milvus --milvus-kill-prob 0.5   # ... and of Milvus

Unless --no-write, the summary is written to bench/RESULTS.md (section `crash-<backend>`, or
`crash-milvus-and-milvus-kills` with --milvus-kill-prob).

Every wait is bounded (`--ready-timeout`, request timeouts, `--max-seconds` for the whole run),
and the server's process group is always SIGKILLed at the end, also on errors and Ctrl-C.
Exit status: 0 all rounds passed, 1 a violation (details, server log and data dir are printed
and kept), 2 the run could not complete (time limit, harness error).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.harness import ServerError, ServerProcess, duet_serve, milvus_lite  # noqa: E402
from bench.results import write_section  # noqa: E402

DIM = 64
SNAPSHOT = "index.snapshot"
SNAPSHOT_TMP = "index.tmp"  # FaissIndex.write_snapshot writes path.with_suffix(".tmp") first
SNAPSHOT_MAGIC = b"DUETIDX3"  # index/engine.py's _MAGIC: keep in step with the snapshot format
REBUILD_LOG = "rebuilding from the store"
MAX_BATCH = 50
MAX_SEARCH_QUERIES = 256  # the server's default DUET_MAX_SEARCH_QUERIES
VECTOR_ATOL = 1e-6
SELF_SCORE_MIN = 0.999
HEADLINE = ("lost", "half-present", "torn", "resurrected", "phantom")  # the summary's named counts
EXAMPLES = 8  # examples printed per kind of violation


class HarnessError(Exception):
    """The run could not go on (not a durability verdict by itself)."""


class ServerDown(Exception):
    """The server exited or never became ready after a restart: a failure of the server."""


# -- the model of what the server must hold ----------------------------------------------------


@dataclass(frozen=True)
class Write:
    """One id's content as written: the vector as sent (float32) and its payload."""

    vector: np.ndarray
    payload: dict

    def same_as(self, other: Write | None) -> bool:
        return other is not None and self.payload == other.payload and np.array_equal(self.vector, other.vector)


State = Write | None  # None: absent (deleted or never written)


@dataclass
class Op:
    """One request: its effect on each id it touches (upsert: last item per id wins)."""

    kind: str  # "upsert" or "delete"
    thread: int
    effects: dict[str, State]
    body: dict


@dataclass
class Observed:
    vector: np.ndarray
    payload: dict


def digest(vector: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(vector, dtype=np.float32).tobytes()).hexdigest()[:16]


def stored_form(vector: np.ndarray, metric: str) -> np.ndarray:
    """What the server stores for a sent vector (index/engine.py::as_matrix)."""
    if metric == "dot":
        return vector
    matrix = vector[None, :].astype(np.float32)
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)[0]


def matches(observed: Observed | None, expected: State, metric: str) -> bool:
    if expected is None or observed is None:
        return expected is None and observed is None
    if observed.payload != expected.payload:
        return False
    want = stored_form(expected.vector, metric)
    if metric == "dot":  # stored as sent: the bits must survive, and match the payload's digest
        return np.array_equal(observed.vector, want) and digest(observed.vector) == expected.payload["digest"]
    return bool(np.allclose(observed.vector, want, rtol=0, atol=VECTOR_ATOL))


@dataclass
class Violations:
    kinds: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, detail: str) -> None:
        self.kinds.setdefault(kind, []).append(detail)

    def count(self, kind: str) -> int:
        return len(self.kinds.get(kind, []))

    def others(self) -> int:
        return sum(len(d) for k, d in self.kinds.items() if k not in HEADLINE)

    def __bool__(self) -> bool:
        return any(self.kinds.values())

    def report(self) -> None:
        for kind, details in self.kinds.items():
            print(f"  VIOLATION {kind}: {len(details)}")
            for detail in details[:EXAMPLES]:
                print(f"    - {detail}")


# -- the server --------------------------------------------------------------------------------


class MilvusLite:
    """`milvus-lite server` on a fresh port each start (same data dir); a log per start."""

    def __init__(self, data_dir: Path, log_dir: Path) -> None:
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.process: ServerProcess | None = None
        self.starts = 0
        self.uri = ""

    def start(self, timeout: float) -> float:
        self.starts += 1
        try:
            self.process = milvus_lite(self.data_dir, self.log_dir / f"milvus-{self.starts:03d}.log").start()
            self.uri = self.process.base
            return self.process.wait_listening(timeout)
        except ServerError as exc:
            raise HarnessError(str(exc)) from None

    def kill(self) -> None:
        process, self.process = self.process, None
        kill(process)


def kill(process: ServerProcess | None) -> None:
    """SIGKILL a process group and reap it; a group that outlives SIGKILL stops the run."""
    if process is not None:
        try:
            process.kill()
        except ServerError as exc:
            raise HarnessError(str(exc)) from None


class Server:
    """`duet serve` on a fresh port each start (same data dir); a log per start, kept."""

    def __init__(
        self, data_dir: Path, log_dir: Path, snapshot_interval: float, milvus: MilvusLite | None = None
    ) -> None:
        self.milvus = milvus
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.process: ServerProcess | None = None
        self.starts = 0
        self.log_path: Path | None = None
        self.url = ""
        self.env = {
            "DUET_PRELOAD_MODELS": "[]",  # vector-only: no model to load, fast start
            "DUET_REGISTER_DEFAULT_MODELS": "false",
            "DUET_SNAPSHOT_INTERVAL_SECONDS": str(snapshot_interval),
            "DUET_FAISS_GPU": "false",
            "DUET_LOG_LEVEL": "info",
            "DUET_COLLECTIONS_BACKEND": "milvus" if milvus else "faiss",
        }

    def start(self) -> None:
        if self.milvus is not None:
            self.env["DUET_MILVUS_URI"] = self.milvus.uri  # a new port after each Milvus restart
        self.starts += 1
        self.log_path = self.log_dir / f"server-{self.starts:03d}.log"
        self.process = duet_serve(self.data_dir, self.log_path, self.env).start()
        self.url = self.process.base

    def wait_ready(self, timeout: float) -> float:
        """Seconds from the start until GET /ready is 200; ServerDown if the server exits or the time runs out."""
        if self.process is None:
            raise ServerDown("server not started")
        try:
            return self.process.wait_ready(timeout, poll=0.1)
        except ServerError as exc:
            raise ServerDown(f"{exc.reason}\n{self.log_tail()}") from None

    def kill(self) -> None:
        """SIGKILL the whole process group (uvicorn and anything it started) and reap it."""
        process, self.process = self.process, None
        kill(process)

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of the current start's log, without uvicorn's per-request access lines."""
        tail = [line for line in self.log_text().splitlines() if '"' not in line or " HTTP/1.1" not in line]
        tail = tail[-lines:]
        return "\n".join(f"    | {line}" for line in tail)


# -- the writers -------------------------------------------------------------------------------


class Writer(threading.Thread):
    """Upserts and deletes the ids it owns until the server dies or it is told to stop.

    `model` is this writer's ids -> last acknowledged state; it persists across rounds.
    `inflight` is the request sent but not answered when the connection broke (or None).
    """

    def __init__(
        self,
        index: int,
        url: str,
        round_no: int,
        model: dict[str, State],
        sent: set[str],
        args: argparse.Namespace,
        seed: int,
        stop: threading.Event,
        violations: Violations,
    ) -> None:
        super().__init__(name=f"writer-{index}", daemon=True)
        self.index = index
        self.url = url
        self.round_no = round_no
        self.model = model
        self.sent = sent
        self.args = args
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.stop = stop
        self.violations = violations
        self.inflight: Op | None = None
        self.acked_requests = 0
        self.acked_items = 0
        self.last_seq = 0
        self.max_seq = 0
        self.batches = 0

    # ops ---------------------------------------------------------------------------------

    def _id(self, k: int) -> str:
        return f"t{self.index}-{k:05d}"

    def _live(self) -> list[str]:
        return [i for i, state in self.model.items() if state is not None]

    def _vector(self) -> np.ndarray:
        vector = self.np_rng.standard_normal(DIM).astype(np.float32)
        if self.args.metric == "dot":  # unit length, so an item's own vector scores ~1 under dot
            vector = (vector / np.linalg.norm(vector)).astype(np.float32)
        return vector

    def next_op(self) -> Op:
        self.batches += 1
        live = self._live()
        space = self.args.ids_per_thread
        roll = self.rng.random()
        if roll < 0.15 and live:
            ids = self.rng.sample(live, min(len(live), self.rng.randint(1, 10)))
            if self.rng.random() < 0.3:
                ids.append(self._id(self.rng.randrange(space)))  # maybe absent: a no-op delete
            ids = list(dict.fromkeys(ids))
            return Op("delete", self.index, {i: None for i in ids}, {"ids": ids})
        size = self.rng.randint(1, MAX_BATCH)
        if roll < 0.45 and live:  # mostly overwrites of live ids
            ids = self.rng.sample(live, min(len(live), size))
            ids += [self._id(self.rng.randrange(space)) for _ in range(size - len(ids))]
        else:  # anywhere in the id space: fresh ids, and overwrites as the space fills up
            ids = [self._id(k) for k in self.rng.sample(range(space), size)]
        ids = list(dict.fromkeys(ids))
        if self.rng.random() < 0.05:
            ids.append(self.rng.choice(ids))  # a repeated id: the later item must win
        items, effects = [], {}
        for n, item_id in enumerate(ids):
            vector = self._vector()
            payload = {
                "round": self.round_no,
                "thread": self.index,
                "batch": self.batches,
                "n": n,
                "digest": digest(vector),
            }
            items.append({"id": item_id, "vector": vector.tolist(), "payload": payload})
            effects[item_id] = Write(vector, payload)
        return Op("upsert", self.index, effects, {"items": items})

    # the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=self.args.request_timeout) as client:
                while not self.stop.is_set():
                    op = self.next_op()
                    self.inflight = op
                    self.sent.update(op.effects)
                    path = f"/v1/collections/{self.args.collection}/items"
                    try:
                        if op.kind == "upsert":
                            reply = client.put(path, json=op.body)
                        else:
                            reply = client.post(f"{path}/delete", json=op.body)
                    except httpx.TransportError:
                        return  # the server died: `op` stays in flight
                    if reply.status_code != 200:
                        kind = "server error (5xx)" if reply.status_code >= 500 else "unexpected status"
                        self.violations.add(kind, f"{op.kind} -> {reply.status_code}: {reply.text[:300]}")
                        return  # its outcome is unknown: leave it in flight
                    self._acknowledged(op, reply.json())
        except Exception as exc:  # a bug here must not pass silently as "no writes"
            self.violations.add("writer crashed", f"{self.name}: {type(exc).__name__}: {exc}")

    def _acknowledged(self, op: Op, body: dict) -> None:
        seq = int(body["seq"])
        if seq < self.last_seq:
            self.violations.add("seq went backwards", f"{self.name}: {op.kind} seq {seq} after {self.last_seq}")
        if op.kind == "upsert" and body.get("upserted") != len(op.effects):
            self.violations.add("bad reply", f"upserted {body.get('upserted')} of {len(op.effects)} ids")
        if op.kind == "delete":
            live_before = {i for i in op.effects if self.model.get(i) is not None}
            if set(body.get("ids", [])) != live_before:
                self.violations.add(
                    "bad reply", f"delete removed {sorted(body.get('ids', []))}, live were {sorted(live_before)}"
                )
        self.model.update(op.effects)
        self.inflight = None
        self.last_seq = seq
        self.max_seq = max(self.max_seq, seq)
        self.acked_requests += 1
        self.acked_items += len(op.effects)


# -- reading and checking the server's state ---------------------------------------------------


class Reader:
    """Verification-side requests; any non-200 (other than an expected 404) is a violation."""

    def __init__(self, url: str, collection: str, violations: Violations, timeout: float) -> None:
        self.client = httpx.Client(base_url=url, timeout=timeout)
        self.base = f"/v1/collections/{collection}"
        self.violations = violations

    def close(self) -> None:
        self.client.close()

    def _ok(self, reply: httpx.Response, what: str, allow_404: bool = False) -> bool:
        if reply.status_code == 200 or (allow_404 and reply.status_code == 404):
            return True
        kind = "server error (5xx)" if reply.status_code >= 500 else "unexpected status"
        self.violations.add(kind, f"{what} -> {reply.status_code}: {reply.text[:300]}")
        return False

    def info(self) -> dict | None:
        reply = self.client.get(self.base)
        return reply.json() if self._ok(reply, "GET collection") else None

    def all_items(self) -> dict[str, Observed] | None:
        """Every item, by cursor pagination in id order (a bounded number of pages)."""
        found: dict[str, Observed] = {}
        cursor: str | None = None
        previous = ""
        for _ in range(100_000):
            params = {"limit": 1000, "with_vector": "true"}
            if cursor is not None:
                params["cursor"] = cursor
            reply = self.client.get(f"{self.base}/items", params=params)
            if not self._ok(reply, "GET items page"):
                return None
            page = reply.json()
            for item in page["items"]:
                if item["id"] <= previous or item["id"] in found:
                    self.violations.add("paging", f"id {item['id']!r} out of order or repeated")
                previous = item["id"]
                found[item["id"]] = Observed(np.asarray(item["vector"], dtype=np.float32), item["payload"])
            cursor = page["next_cursor"]
            if cursor is None:
                return found
        raise HarnessError("paging did not end")

    def get(self, item_id: str) -> Observed | None | bool:
        """The item, None on 404, False on any other failure."""
        reply = self.client.get(f"{self.base}/items/{item_id}", params={"with_vector": "true"})
        if not self._ok(reply, f"GET item {item_id}", allow_404=True):
            return False
        if reply.status_code == 404:
            return None
        body = reply.json()
        return Observed(np.asarray(body["vector"], dtype=np.float32), body["payload"])

    def search(self, body: dict) -> list | None:
        reply = self.client.post(f"{self.base}/search", json=body)
        return reply.json()["results"] if self._ok(reply, "search") else None


@dataclass
class RoundStats:
    committed: int = 0
    rolled_back: int = 0
    indistinct: int = 0
    verified: int = 0
    live: int = 0


def resolve_inflight(
    ops: list[Op], models: list[dict[str, State]], observed: dict[str, Observed], metric: str, violations: Violations
) -> RoundStats:
    """Decide, per in-flight request, whether it committed (wholly) or not, and fold it in."""
    stats = RoundStats()
    for op in ops:
        model = models[op.thread]
        changed = [i for i, new in op.effects.items() if not _same(new, model.get(i))]
        if not changed:
            stats.indistinct += 1
            continue
        new = [i for i in changed if matches(observed.get(i), op.effects[i], metric)]
        old = [i for i in changed if matches(observed.get(i), model.get(i), metric)]
        neither = [i for i in changed if i not in new and i not in old]
        label = f"writer {op.thread} {op.kind} of {len(op.effects)} ids"
        if neither:
            violations.add("torn", f"{label}: {neither[:5]} match neither the acknowledged nor the sent state")
        elif new and old:
            violations.add(
                "half-present", f"{label}: {len(new)} ids new (e.g. {new[:3]}), {len(old)} old (e.g. {old[:3]})"
            )
        if neither or (new and old):  # reported once: take what is there, so later checks don't repeat it
            model.update({i: _as_write(observed.get(i)) for i in op.effects})
        elif new:
            stats.committed += 1
            model.update(op.effects)
        else:
            stats.rolled_back += 1
    return stats


def _as_write(observed: Observed | None) -> State:
    return None if observed is None else Write(observed.vector, observed.payload)


def _same(a: State, b: State) -> bool:
    return a is None and b is None or (a is not None and a.same_as(b))


def compare_all(
    models: list[dict[str, State]], sent: set[str], observed: dict[str, Observed], metric: str, v: Violations
) -> dict[str, Write]:
    """Every id the server holds or must hold; returns the expected live items."""
    expected: dict[str, State] = {}
    for model in models:
        expected.update(model)
    for item_id in sorted(set(expected) | set(observed)):
        want, got = expected.get(item_id), observed.get(item_id)
        if item_id not in sent:
            v.add("phantom", f"{item_id} exists but was never written")
        elif want is None and got is not None:
            v.add("resurrected", f"{item_id} is present after an acknowledged delete (payload {got.payload})")
        elif want is not None and got is None:
            v.add("lost", f"{item_id} missing; last acknowledged payload {want.payload}")
        elif not matches(got, want, metric):
            v.add("lost", f"{item_id} holds {got.payload}, last acknowledged {want.payload}")
    return {i: w for i, w in expected.items() if w is not None}


def check_counts(reader: Reader, live: dict[str, Write], max_seq: int, v: Violations) -> None:
    info = reader.info()
    if info is None:
        return
    stats = info["stats"]
    if info["count"] != len(live):
        v.add("count", f"collection count {info['count']}, expected {len(live)} live ids")
    vectors = stats["index"].get("vectors")  # faiss only: the index beside the store
    if vectors is not None and vectors != info["count"]:
        v.add("index", f"index holds {stats['index']['vectors']} vectors, store {info['count']} items")
    if stats["seq"] is not None and stats["seq"] < max_seq:  # milvus: no per-collection seq
        v.add("seq", f"store seq {stats['seq']} is behind an acknowledged seq {max_seq}")


def check_single_gets(
    reader: Reader, live: dict[str, Write], deleted: list[str], metric: str, rng: random.Random, v: Violations
) -> None:
    for item_id in rng.sample(sorted(live), min(20, len(live))):
        got = reader.get(item_id)
        if got is not False and not matches(got or None, live[item_id], metric):
            v.add("lost", f"GET {item_id} does not return its last acknowledged state")
    for item_id in rng.sample(deleted, min(20, len(deleted))):
        got = reader.get(item_id)
        if got is not False and got is not None:
            v.add("resurrected", f"GET {item_id} returns a deleted item")


def check_search(reader: Reader, live: dict[str, Write], rng: random.Random, v: Violations) -> None:
    """Every live item is its own top hit; id queries return live neighbours, never themselves."""
    ids = sorted(live)
    for start in range(0, len(ids), MAX_SEARCH_QUERIES):
        chunk = ids[start : start + MAX_SEARCH_QUERIES]
        queries = [{"vector": live[i].vector.tolist()} for i in chunk]
        results = reader.search({"queries": queries, "k": 1})
        if results is None:
            return
        for item_id, hits in zip(chunk, results):
            if not hits or hits[0]["id"] != item_id or hits[0]["score"] < SELF_SCORE_MIN:
                top = hits[0] if hits else None
                v.add("search", f"own vector of {item_id}: top hit {top and (top['id'], round(top['score'], 4))}")
    for item_id in rng.sample(ids, min(10, len(ids))):
        hits = reader.search({"query": {"id": item_id}, "k": 5})
        if hits is None:
            return
        found = [h["id"] for h in hits]
        scores = [h["score"] for h in hits]
        if len(found) != min(5, len(ids) - 1) or item_id in found or not set(found) <= live.keys():
            v.add("search", f"id query {item_id}: got {found}")
        elif scores != sorted(scores, reverse=True):
            v.add("search", f"id query {item_id}: scores not descending {scores}")


# -- one round ---------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    server: Server
    models: list[dict[str, State]]
    sent: set[str] = field(default_factory=set)
    max_seq: int = 0
    acked_requests: int = 0
    acked_items: int = 0
    inflight: int = 0
    committed: int = 0
    snapshot_kills: int = 0
    startup_kills: int = 0
    milvus_kills: int = 0
    restart_times: list[float] = field(default_factory=list)

    @property
    def collection_dir(self) -> Path:
        return self.server.data_dir / "collections" / self.args.collection


def tmp_stamp(run: Run) -> tuple[int, int] | None:
    """Identity of the snapshot temp file, which exists only while a snapshot is being written."""
    try:
        stat = (run.collection_dir / SNAPSHOT_TMP).stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def wait_for_snapshot_write(run: Run, stale: tuple[int, int] | None, timeout: float) -> None:
    """Poll until the server is writing a snapshot (a new temp file), so the kill lands mid-write."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and tmp_stamp(run) in (None, stale):
        time.sleep(0.0002)


def load_and_kill(run: Run, round_no: int, rng: random.Random, v: Violations) -> tuple[list[Writer], bool]:
    """Writers hammer the server; SIGKILL it after a random delay. Returns (writers, mid-snapshot?)."""
    stop = threading.Event()
    writers = [
        Writer(t, run.server.url, round_no, run.models[t], run.sent, run.args, rng.getrandbits(32), stop, v)
        for t in range(run.args.threads)
    ]
    stale = tmp_stamp(run)  # a half-written snapshot left by an earlier kill, if any
    for writer in writers:
        writer.start()
    time.sleep(rng.uniform(run.args.min_delay, run.args.max_delay))
    if rng.random() < run.args.snapshot_kill_prob:
        wait_for_snapshot_write(run, stale, timeout=3 * run.args.snapshot_interval)
    run.server.kill()  # first kill, then stop: requests are in flight when the server dies
    if run.server.milvus is not None and rng.random() < run.args.milvus_kill_prob:
        run.server.milvus.kill()  # Milvus itself, right after the server: its last acks must survive too
        run.milvus_kills += 1
    mid_snapshot = tmp_stamp(run) not in (None, stale)
    stop.set()
    for writer in writers:
        writer.join(timeout=run.args.request_timeout + 10)
        if writer.is_alive():
            raise HarnessError(f"{writer.name} did not finish after the kill")
    return writers, mid_snapshot


def corrupt_snapshot(run: Run, how: str, rng: random.Random) -> None:
    path = run.collection_dir / SNAPSHOT
    original = path.read_bytes() if path.exists() else b""
    if how == "garbage":
        path.write_bytes(rng.randbytes(max(len(original), 4096)))
    else:  # truncated: a real header and half of the FAISS blob
        path.write_bytes(original[: max(len(original) // 2, 1)] if original else SNAPSHOT_MAGIC + b"\x00")


def restart(run: Run, rng: random.Random, allow_startup_kill: bool) -> float:
    milvus = run.server.milvus
    if milvus is not None and milvus.process is None:
        milvus.start(run.args.ready_timeout)
    if allow_startup_kill and rng.random() < run.args.startup_kill_prob:
        run.server.start()  # killed again during start-up (open, replay, first snapshot)
        time.sleep(rng.uniform(0.1, 5.0))
        run.server.kill()
        run.startup_kills += 1
    run.server.start()
    took = run.server.wait_ready(run.args.ready_timeout)
    run.restart_times.append(took)
    return took


def verify(run: Run, writers: list[Writer], rng: random.Random, v: Violations) -> RoundStats:
    reader = Reader(run.server.url, run.args.collection, v, run.args.request_timeout)
    try:
        if reader.info() is None:
            return RoundStats()
        observed = reader.all_items()
        if observed is None:
            return RoundStats()
        ops = [w.inflight for w in writers if w.inflight is not None]
        stats = resolve_inflight(ops, run.models, observed, run.args.metric, v)
        live = compare_all(run.models, run.sent, observed, run.args.metric, v)
        deleted = sorted(i for m in run.models for i, s in m.items() if s is None)
        check_counts(reader, live, run.max_seq, v)
        check_single_gets(reader, live, deleted, run.args.metric, rng, v)
        check_search(reader, live, rng, v)
        stats.verified, stats.live = len(set(observed) | run.sent), len(live)
        return stats
    finally:
        reader.close()


def wait_snapshot_rewritten(run: Run, timeout: float, v: Violations) -> None:
    """After a rebuild the server must write a good snapshot again within a few intervals."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=run.server.url, timeout=run.args.request_timeout) as client:
        while time.monotonic() < deadline:
            reply = client.get(f"/v1/collections/{run.args.collection}")
            current = reply.status_code == 200 and reply.json()["stats"]["index"]["snapshot_current"]
            if current and (run.collection_dir / SNAPSHOT).read_bytes().startswith(SNAPSHOT_MAGIC):
                return
            time.sleep(0.2)
    v.add("snapshot", f"no good snapshot written within {timeout:.0f}s after the rebuild")


def play_round(run: Run, round_no: int, label: str, corrupt: str | None, rng: random.Random) -> Violations:
    v = Violations()
    writers, mid_snapshot = load_and_kill(run, round_no, rng, v)
    if corrupt:
        corrupt_snapshot(run, corrupt, rng)
    took = restart(run, rng, allow_startup_kill=corrupt is None)
    stats = verify(run, writers, rng, v)
    rebuilt = corrupt is not None and REBUILD_LOG in run.server.log_text()
    if corrupt is not None and not v:
        if not rebuilt:
            v.add("snapshot", "the corrupt snapshot was not reported as rebuilt (log line missing)")
        wait_snapshot_rewritten(run, 10 * run.args.snapshot_interval + 5, v)

    requests = sum(w.acked_requests for w in writers)
    items = sum(w.acked_items for w in writers)
    inflight = sum(w.inflight is not None for w in writers)
    run.acked_requests += requests
    run.acked_items += items
    run.inflight += inflight
    run.committed += stats.committed
    run.snapshot_kills += mid_snapshot
    run.max_seq = max([run.max_seq, *(w.max_seq for w in writers)])
    notes = [n for n, on in (("killed mid-snapshot", mid_snapshot), (f"snapshot {corrupt}, rebuilt", rebuilt)) if on]
    print(
        f"{label:>12}  acked {requests:4d} writes ({items:5d} items)  in flight {inflight}"
        f" (committed {stats.committed}, not {stats.rolled_back}, indistinct {stats.indistinct})"
        f"  verified {stats.verified:5d} ids ({stats.live} live)  restart {took:4.1f}s"
        + (f"  [{'; '.join(notes)}]" if notes else ""),
        flush=True,
    )
    return v


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="kill/restart rounds (default 20)")
    parser.add_argument("--threads", type=int, default=4, help="concurrent writers (default 4)")
    parser.add_argument("--ids-per-thread", type=int, default=2000, help="id space of each writer (default 2000)")
    parser.add_argument("--metric", choices=["cosine", "dot"], default="cosine", help="collection metric")
    parser.add_argument("--collection", default="crash")
    parser.add_argument("--min-delay", type=float, default=0.2, help="seconds of load before the kill, at least")
    parser.add_argument("--max-delay", type=float, default=3.0, help="... and at most")
    parser.add_argument(
        "--snapshot-kill-prob", type=float, default=0.25, help="chance a kill waits for a snapshot being written"
    )
    parser.add_argument("--startup-kill-prob", type=float, default=0.2, help="chance a restart is killed mid-start")
    parser.add_argument("--snapshot-interval", type=float, default=1.0, help="DUET_SNAPSHOT_INTERVAL_SECONDS")
    parser.add_argument(
        "--corrupt-snapshot",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end with rounds that overwrite the index snapshot (garbage, truncated)",
    )
    parser.add_argument("--ready-timeout", type=float, default=90.0, help="seconds a start may take")
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--max-seconds", type=float, default=480.0, help="stop starting rounds after this long")
    parser.add_argument("--seed", type=int, default=None, help="seed of the op stream (default: random)")
    parser.add_argument("--keep", action="store_true", help="keep the data dir and logs even when all pass")
    parser.add_argument(
        "--backend", choices=["faiss", "milvus"], default="faiss", help="collections backend (default faiss)"
    )
    parser.add_argument(
        "--milvus-kill-prob", type=float, default=0.0, help="milvus: chance a kill also SIGKILLs the Milvus server"
    )
    parser.add_argument("--no-write", action="store_true", help="do not write the summary to bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.backend == "milvus":  # no snapshot on this backend
        args.corrupt_snapshot = False
        args.snapshot_kill_prob = 0.0
    return args


def write_results(
    args: argparse.Namespace,
    argv: list[str] | None,
    seed: int,
    summary: str,
    counts: str,
    result: str,
    failed: Violations,
) -> None:
    """The run's summary as the `crash-<backend>` section of bench/RESULTS.md."""
    command = shlex.join(["python", "bench/crash_test.py", *(sys.argv[1:] if argv is None else argv)])
    what = (
        "`duet serve` (DUET_COLLECTIONS_BACKEND=milvus) on a `milvus-lite server` the test starts; "
        + (
            f"the Milvus server is SIGKILLed too at {args.milvus_kill_prob:.0%} of the kills"
            if args.milvus_kill_prob
            else "only `duet serve` is killed (Milvus keeps running)"
        )
        if args.backend == "milvus"
        else f"`duet serve` (faiss: SQLite store + FAISS index, snapshots every {args.snapshot_interval:g}s)"
    )
    lines = [
        f"## Crash test, {args.backend} backend"
        + (", Milvus killed too" if args.backend == "milvus" and args.milvus_kill_prob else "")
        + " (`bench/crash_test.py`)",
        f"- Command: `{command}` (seed {seed})",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}; {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end",
        f"- What: {args.threads} writers upsert/delete {DIM}-d vectors (metric {args.metric}); SIGKILL of the "
        f"server's process group after {args.min_delay:g}-{args.max_delay:g}s of load, restart, full comparison; "
        + what,
        f"- {summary}",
        f"- {counts}",
        f"- Result: **{result}**",
    ]
    for kind, details in failed.kinds.items():
        lines.append(f"  - {kind}: {len(details)}, e.g. {details[0][:200]}")
    section = f"crash-{args.backend}" + (
        "-and-milvus-kills" if args.backend == "milvus" and args.milvus_kill_prob else ""
    )
    write_section(section, "\n".join(lines))


def _terminate(signum, frame):  # SIGTERM -> the same clean-up path as Ctrl-C
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    signal.signal(signal.SIGTERM, _terminate)
    root = Path(tempfile.mkdtemp(prefix="duet-crash-"))
    milvus = MilvusLite(root / "milvus", root) if args.backend == "milvus" else None
    server = Server(root / "data", root, args.snapshot_interval, milvus)
    run = Run(args, server, models=[{} for _ in range(args.threads)])
    plan = [(f"round {r}/{args.rounds}", r, None) for r in range(1, args.rounds + 1)]
    if args.corrupt_snapshot:
        plan += [("garbage", args.rounds + 1, "garbage"), ("truncated", args.rounds + 2, "truncated")]
    started = time.monotonic()
    status, failed, done = 2, Violations(), 0
    print(
        f"crash test: backend {args.backend}, seed {seed}, metric {args.metric}, {args.threads} writers, dir {root}",
        flush=True,
    )
    try:
        if milvus is not None:
            print(f"milvus-lite server listening after {milvus.start(args.ready_timeout):.1f}s", flush=True)
        server.start()
        print(f"first start {server.wait_ready(args.ready_timeout):.1f}s", flush=True)
        reply = httpx.post(
            f"{server.url}/v1/collections",
            json={"name": args.collection, "dimension": DIM, "metric": args.metric},
            timeout=args.request_timeout,
        )
        if reply.status_code != 201:
            raise HarnessError(f"creating the collection: {reply.status_code} {reply.text[:300]}")
        for label, round_no, corrupt in plan:
            if time.monotonic() - started > args.max_seconds:
                raise HarnessError(f"time limit of {args.max_seconds:.0f}s reached after {done} rounds")
            failed = play_round(run, round_no, label, corrupt, rng)
            if failed:
                print(f"{label} FAILED (seed {seed}); server log of the last start:\n{server.log_tail()}")
                failed.report()
                status = 1
                break
            done += 1
        else:
            status = 0
    except ServerDown as exc:
        print(f"FAILED: {exc}", flush=True)
        failed.add("server down", str(exc).splitlines()[0])
        status = 1
    except httpx.TransportError as exc:  # the restarted server went away while being checked
        print(f"FAILED: lost the connection to the server: {exc!r}\n{server.log_tail()}", flush=True)
        failed.add("server down", repr(exc))
        status = 1
    except HarnessError as exc:
        print(f"ERROR: {exc}", flush=True)
        status = 2
    except Exception:
        traceback.print_exc()
        status = 2
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        status = 2
    finally:
        server.kill()
        if milvus is not None:
            milvus.kill()
    elapsed = time.monotonic() - started
    times = run.restart_times or [0.0]
    summary = (
        f"summary: {done} rounds passed in {elapsed:.0f}s, "
        f"{run.acked_requests} acknowledged writes ({run.acked_items} item writes), "
        f"{run.inflight} in flight at a kill ({run.committed} committed), "
        f"{run.snapshot_kills} kills mid-snapshot, {run.startup_kills} kills mid-start, "
        + (f"{run.milvus_kills} kills of the Milvus server too, " if milvus is not None else "")
        + f"restart {np.mean(times):.1f}s mean / {max(times):.1f}s max"
    )
    counts = (
        f"lost = {failed.count('lost')}, half-present = {failed.count('half-present')}, "
        f"torn = {failed.count('torn')}, resurrected = {failed.count('resurrected')}, "
        f"phantom = {failed.count('phantom')}, other violations = {failed.others()}"
    )
    result = ("PASS", "FAIL", "INCOMPLETE")[status]
    print(f"\n{summary}\n         {counts}\nresult: {result}")
    if not args.no_write:
        write_results(args, argv, seed, summary, counts, result, failed)
    if status == 0 and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"data dir and server logs kept in {root}")
    return status


if __name__ == "__main__":
    sys.exit(main())

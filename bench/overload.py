"""Overload benchmark: what Duet does past its capacity, and whether its memory stays flat.

Why it exists: an outside red-team run (issue 11) drove /v1/embeddings at 4x its measured
capacity for 3 minutes and got no 429 at all: requests piled up ahead of the batch queue and
the server's p50 reached 13.5 s, p99 48 s. Admission control (`DUET_MAX_QUEUE_WAIT_MS`, see
docs/architecture.md) should turn that excess into 429 + Retry-After while accepted requests
stay within about twice the wait budget. This script measures exactly that, plus a soak at
about capacity that shows whether the server's memory creeps.

How to run (from the repository root):

    python bench/overload.py            # full: ~14 min (capacity 60 s, 4x for 180 s, soak 600 s)
    python bench/overload.py --quick    # smoke run: ~2 min
    python bench/overload.py --overload-seconds 60 --soak-seconds 0

Method:
- one `duet serve` subprocess (minilm preloaded) on a free port, its RSS (whole process tree)
  sampled every `--rss-every` seconds through every phase;
- capacity: closed loop, `--capacity-concurrency` keep-alive connections sending 8-input
  requests (STS-B sentences) back to back for `--capacity-seconds` (pausing 0.5 s after a
  429): inputs/s answered 200;
- overload: open loop at `--overload-factor` x capacity (in requests/s of 8 inputs, evenly
  spaced arrivals) for `--overload-seconds`: each request leaves at its scheduled time on an
  idle connection or a new one, whatever happened to earlier ones, so a slow server cannot
  slow the offered load down (a closed loop would hide the overload). Latency runs from the
  scheduled time to the end of the response, so time spent waiting in the client counts too;
- soak: the same open loop at `--soak-factor` x capacity for `--soak-seconds`, embeddings only;
- the load client is this process (asyncio streams, request bytes built before the clock
  starts); its CPU use and the CPU used by other processes on the machine are reported, since
  on a shared 2-core machine both move the numbers.
Writes its section of bench/RESULTS.md (`<!-- overload:start -->`) through bench/results.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.harness import HOST, code_state  # noqa: E402
from bench.results import write_section  # noqa: E402
from bench.serve import (  # noqa: E402
    CODE_DIRS,
    DEFAULT_TEXTS,
    MODEL_NAME,
    command_line,
    duet_spec,
    http_post,
    load_texts,
    machine_busy_seconds,
    read_head,
    serve_machine,
    tree_cpu_seconds,
    tree_peak_rss_kb,
    tree_rss_kb,
    wait_for_quiet,
    workload,
)

SECTION = "overload"
PER_REQUEST = 8
PATH = "/v1/embeddings"


# -- HTTP ----------------------------------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status, headers = await read_head(reader)
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


@dataclass
class Phase:
    """What one load phase saw."""

    name: str
    offered_rps: float = 0.0  # open loop: scheduled requests/s; closed loop: 0
    seconds: float = 0.0
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    accepted: list[float] = field(default_factory=list)  # latency (s) of the 200s
    refused: list[float] = field(default_factory=list)  # latency (s) of the 429s
    retry_after: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # client-side failures by kind
    first_error: str | None = None
    peak_connections: int = 0
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    other_cpu: float = 0.0

    def record(self, status: int, headers: dict[str, str], body: bytes, latency: float) -> None:
        self.statuses[status] += 1
        if status == 200:
            self.accepted.append(latency)
        elif status == 429:
            self.refused.append(latency)
            self.retry_after[headers.get("retry-after", "?")] += 1
        elif self.first_error is None:
            self.first_error = f"HTTP {status}: {body[:200].decode(errors='replace')}"

    def fail(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if self.first_error is None:
            self.first_error = f"{kind}: {detail}"

    @property
    def accepted_inputs_per_s(self) -> float:
        return len(self.accepted) * PER_REQUEST / self.seconds if self.seconds else 0.0

    def pct_ms(self, values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) * 1000 if values else float("nan")


IDLE_CLOSE_S = 3.0  # uvicorn closes keep-alive connections idle for 5 s; drop ours before that


class Connections:
    """Idle keep-alive connections, opened on demand (an open loop never waits for one)."""

    def __init__(self, port: int, phase: Phase) -> None:
        self.port = port
        self.phase = phase
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.open = 0

    async def get(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        now = time.monotonic()
        while self.idle:
            reader, writer, since = self.idle.pop()
            if now - since < IDLE_CLOSE_S:
                return reader, writer
            self.open -= 1
            writer.close()
        pair = await asyncio.open_connection(HOST, self.port, limit=1 << 22)
        self.open += 1
        self.phase.peak_connections = max(self.phase.peak_connections, self.open)
        return pair

    def put(self, pair: tuple[asyncio.StreamReader, asyncio.StreamWriter], keep: bool) -> None:
        if keep:
            self.idle.append((*pair, time.monotonic()))
        else:
            self.open -= 1
            pair[1].close()

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


async def _send(conns: Connections, request: bytes, due: float, timeout: float) -> int:
    """Send one request; its status (0 for a client-side failure)."""
    loop = asyncio.get_running_loop()
    pair = None
    try:
        pair = await asyncio.wait_for(conns.get(), timeout)
        pair[1].write(request)
        status, headers, body = await asyncio.wait_for(read_response(pair[0]), timeout)
    except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
        conns.phase.fail(type(exc).__name__, str(exc))
        if pair is not None:
            conns.put(pair, keep=False)
        return 0
    conns.phase.record(status, headers, body, loop.time() - due)
    conns.put(pair, keep=headers.get("connection", "").lower() != "close")
    return status


async def open_loop(port: int, requests: list[bytes], rps: float, seconds: float, phase: Phase, timeout: float) -> None:
    """Send requests at `rps`, evenly spaced, for `seconds`, whatever the answers take."""
    loop = asyncio.get_running_loop()
    conns = Connections(port, phase)
    tasks: set[asyncio.Task] = set()
    start = loop.time()
    count = int(rps * seconds)
    for n in range(count):
        due = start + n / rps
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(_send(conns, requests[n % len(requests)], due, timeout))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    phase.sent = count
    if tasks:
        await asyncio.wait(set(tasks), timeout=timeout + 5)
    phase.seconds = loop.time() - start
    conns.close()


async def closed_loop(port: int, requests: list[bytes], concurrency: int, seconds: float, phase: Phase, timeout: float):
    loop = asyncio.get_running_loop()
    conns = Connections(port, phase)
    start = loop.time()
    counter = iter(range(1 << 30))

    async def worker() -> None:
        # A well-behaved client: after a 429 it waits (up to Retry-After; 0.5 s here) instead of
        # hammering, so the loop keeps the server saturated without a storm of refusals.
        while loop.time() - start < seconds:
            n = next(counter)
            phase.sent += 1
            if await _send(conns, requests[n % len(requests)], loop.time(), timeout) == 429:
                await asyncio.sleep(0.5)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    phase.seconds = loop.time() - start
    conns.close()


def run_phase(server_pid: int, phase: Phase, coro_factory) -> Phase:
    client, server, busy = time.process_time(), tree_cpu_seconds(server_pid), machine_busy_seconds()
    wall = time.perf_counter()
    asyncio.run(coro_factory())
    wall = time.perf_counter() - wall
    phase.client_cpu = (time.process_time() - client) / wall
    phase.server_cpu = (tree_cpu_seconds(server_pid) - server) / wall
    phase.other_cpu = max(0.0, (machine_busy_seconds() - busy) / wall - phase.client_cpu - phase.server_cpu)
    return phase


# -- RSS sampling --------------------------------------------------------------------------------


class RssSampler:
    """Samples the server tree's RSS every `every` seconds, labelled with the current phase."""

    def __init__(self, pid: int, every: float) -> None:
        self.pid = pid
        self.every = every
        self.phase = "start"
        self.samples: list[tuple[str, float, int]] = []  # (phase, seconds into it, kB)
        self._phase_started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def enter(self, phase: str) -> None:
        self.phase, self._phase_started = phase, time.monotonic()
        self.sample()

    def sample(self) -> None:
        self.samples.append((self.phase, time.monotonic() - self._phase_started, tree_rss_kb(self.pid)))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def of(self, phase: str) -> list[tuple[float, int]]:
        return [(t, kb) for p, t, kb in self.samples if p == phase]


# -- report --------------------------------------------------------------------------------------


def _mib(kb: int) -> str:
    return f"{kb / 1024:.0f}"


def describe(phase: Phase) -> str:
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(phase.statuses.items()))
    errors = f", client errors {dict(phase.errors)}" if phase.errors else ""
    return (
        f"{phase.name}: sent {phase.sent} in {phase.seconds:.0f}s ({statuses}{errors}); accepted "
        f"{phase.accepted_inputs_per_s:.0f} inputs/s, p50 {phase.pct_ms(phase.accepted, 50):.0f} ms, "
        f"p99 {phase.pct_ms(phase.accepted, 99):.0f} ms, max {phase.pct_ms(phase.accepted, 100):.0f} ms; "
        f"429 p99 {phase.pct_ms(phase.refused, 99):.0f} ms; peak connections {phase.peak_connections}; "
        f"CPU server {phase.server_cpu:.2f} client {phase.client_cpu:.2f} other {phase.other_cpu:.2f} cores"
    )


def _phase_rows(phases: list[Phase]) -> list[str]:
    lines = [
        "| phase | offered | sent | 200 | 429 | other | accepted inputs/s | p50 ms | p99 ms | max ms "
        "| 429 p99 ms | Retry-After seen | CPU server / client / other |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        other = sum(n for code, n in p.statuses.items() if code not in (200, 429)) + sum(p.errors.values())
        offered = f"{p.offered_rps * PER_REQUEST:.0f} inputs/s" if p.offered_rps else "closed loop"
        retry = ", ".join(f"{v} s: {n}" for v, n in sorted(p.retry_after.items())) or "-"
        lines.append(
            f"| {p.name} | {offered} | {p.sent} | {p.statuses.get(200, 0)} | {p.statuses.get(429, 0)} | {other} "
            f"| {p.accepted_inputs_per_s:.0f} | {p.pct_ms(p.accepted, 50):.0f} | {p.pct_ms(p.accepted, 99):.0f} "
            f"| {p.pct_ms(p.accepted, 100):.0f} | {p.pct_ms(p.refused, 99):.0f} | {retry} "
            f"| {p.server_cpu:.2f} / {p.client_cpu:.2f} / {p.other_cpu:.2f} |"
        )
    return lines


def render(args, machine: str, code: str, capacity: Phase, phases: list[Phase], rss: RssSampler, peak_kb: int) -> str:
    budget_ms = args.max_queue_wait_ms
    overload = next((p for p in phases if p.name.startswith("overload")), None)
    lines = [
        "## Overload and soak (bench/overload.py)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: `{command_line()}`",
        "",
        f"Machine: {machine}. Code: {code}.",
        f"Server: `duet serve`, {MODEL_NAME} preloaded, DUET_MAX_QUEUE_WAIT_MS={budget_ms}; "
        f"requests of {PER_REQUEST} STS-B sentences. Latency is client-side, from each request's scheduled "
        "send time to the end of its response.",
        "",
        f"Capacity (closed loop, {args.capacity_concurrency} connections, {capacity.seconds:.0f}s): "
        f"**{capacity.accepted_inputs_per_s:.0f} inputs/s**, p50 {capacity.pct_ms(capacity.accepted, 50):.0f} ms, "
        f"p99 {capacity.pct_ms(capacity.accepted, 99):.0f} ms.",
        "",
        *_phase_rows([capacity, *phases]),
        "",
    ]
    if overload is not None and overload.accepted:
        p99 = overload.pct_ms(overload.accepted, 99)
        share = overload.statuses.get(429, 0) / max(1, overload.sent)
        verdict = "met" if p99 <= 2 * budget_ms else "NOT met"
        served = overload.accepted_inputs_per_s
        lines += [
            f"Overload target (p99 of accepted <= 2 x budget = {2 * budget_ms} ms, excess refused with 429): "
            f"p99 {p99:.0f} ms, {share:.0%} of requests refused: **{verdict}**. The server answered {served:.0f} "
            f"inputs/s meanwhile, so the offered load was {overload.offered_rps * PER_REQUEST / served:.1f}x what it "
            "could serve then (capacity moves with what else runs on the machine).",
            "",
        ]
    lines += [f"Server RSS (MiB, process tree) every {args.rss_every:g} s; peak (VmHWM) {_mib(peak_kb)} MiB:", ""]
    for name in ["ready", "capacity", *(p.name for p in phases)]:
        series = rss.of(name)
        if series:
            values = " ".join(_mib(kb) for _, kb in series)
            lines.append(f"- {name}: {values} (first {_mib(series[0][1])}, last {_mib(series[-1][1])})")
    busy = [p for p in (capacity, *phases) if p.other_cpu > 0.25]
    if busy:
        lines += [
            "",
            "Note: the machine is shared; other processes used "
            + ", ".join(f"{p.other_cpu:.2f} cores during {p.name}" for p in busy)
            + ", which lowers capacity and raises latency in those phases.",
        ]
    errors = [f"{p.name}: {p.first_error}" for p in (capacity, *phases) if p.first_error]
    if errors:
        lines += ["", "First non-200/429 answer or client error per phase:", "", "```", *errors, "```"]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    beside = Path(sys.executable).with_name("duet")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short phases (~2 min in all) to check the script")
    parser.add_argument("--capacity-seconds", type=float, help="closed-loop capacity run (60; quick 15)")
    parser.add_argument("--capacity-concurrency", type=int, default=16, help="connections for capacity (16)")
    parser.add_argument("--overload-factor", type=float, default=4.0, help="offered load / capacity (4)")
    parser.add_argument("--overload-seconds", type=float, help="open-loop overload (180; quick 30)")
    parser.add_argument("--soak-factor", type=float, default=1.0, help="soak load / capacity (1.0)")
    parser.add_argument("--soak-seconds", type=float, help="open-loop soak (600; quick 30; 0 skips it)")
    parser.add_argument("--rss-every", type=float, default=10.0, help="seconds between RSS samples (10)")
    parser.add_argument("--max-queue-wait-ms", type=int, default=2000, help="the server's DUET_MAX_QUEUE_WAIT_MS")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds before a request is given up")
    parser.add_argument("--startup-timeout", type=float, default=240.0)
    parser.add_argument("--quiet-wait", type=float, help="wait this long at most for other processes to idle (60)")
    parser.add_argument("--texts-file", type=Path, default=DEFAULT_TEXTS)
    parser.add_argument("--duet", default=str(beside) if beside.exists() else "duet")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args(argv)
    quick = args.quick
    args.capacity_seconds = args.capacity_seconds or (15.0 if quick else 60.0)
    args.overload_seconds = args.overload_seconds if args.overload_seconds is not None else (30.0 if quick else 180.0)
    args.soak_seconds = args.soak_seconds if args.soak_seconds is not None else (30.0 if quick else 600.0)
    args.quiet_wait = args.quiet_wait if args.quiet_wait is not None else (5.0 if quick else 60.0)
    return args


def build_requests(texts: list[str], count: int, port: int) -> list[bytes]:
    inputs = workload(texts, count * PER_REQUEST, seed=3)
    return [
        http_post(PATH, port, json.dumps({"input": inputs[i : i + PER_REQUEST], "model": MODEL_NAME}).encode())
        for i in range(0, len(inputs), PER_REQUEST)
    ]


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in `with` blocks
    args = parse_args(argv)
    code, machine = code_state(CODE_DIRS), serve_machine()
    texts = load_texts(args.texts_file)
    with tempfile.TemporaryDirectory(prefix="duet-overload-") as tmp:
        spec = duet_spec(argparse.Namespace(duet=args.duet), Path(tmp) / "data")
        spec.env["DUET_MAX_QUEUE_WAIT_MS"] = str(args.max_queue_wait_ms)
        requests = build_requests(texts, 2000, spec.port)
        with spec.process(Path(tmp) / "duet.log") as server:
            server.wait_ready(args.startup_timeout, spec.ready_path, poll=0.5)
            rss = RssSampler(server.pid, args.rss_every)
            rss.start()
            rss.enter("ready")
            timeout = args.request_timeout
            run_phase(
                server.pid, Phase("warm-up"), lambda: closed_loop(spec.port, requests, 4, 5.0, Phase("w"), timeout)
            )
            wait_for_quiet(args.quiet_wait)
            rss.enter("capacity")
            capacity = Phase("capacity")
            run_phase(
                server.pid,
                capacity,
                lambda: closed_loop(
                    spec.port, requests, args.capacity_concurrency, args.capacity_seconds, capacity, timeout
                ),
            )
            print(describe(capacity), flush=True)
            if not capacity.accepted:
                raise SystemExit(f"no request succeeded while measuring capacity: {capacity.first_error}")
            capacity_rps = capacity.accepted_inputs_per_s / PER_REQUEST
            plan = [
                ("overload", args.overload_factor, args.overload_seconds),
                ("soak", args.soak_factor, args.soak_seconds),
            ]
            phases = []
            for name, factor, seconds in plan:
                if seconds <= 0:
                    continue
                label = f"{name} {factor:g}x"
                phase = Phase(label, offered_rps=factor * capacity_rps)
                rss.enter(label)
                run_phase(
                    server.pid,
                    phase,
                    lambda p=phase, s=seconds: open_loop(spec.port, requests, p.offered_rps, s, p, timeout),
                )
                print(describe(phase), flush=True)
                phases.append(phase)
            rss.stop()
            peak_kb = tree_peak_rss_kb(server.pid)
            problems, first = server.log_problems()
    section = render(args, machine, code, capacity, phases, rss, peak_kb)
    if problems:
        section += f"\n\nServer log: {problems} error-like lines, first: `{first[0] if first else ''}`"
    print("\n" + section)
    if not args.no_write:
        write_section(SECTION, section, args.results)
        print(f"\nwritten to {args.results}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

"""A Milvus client that connects lazily, reconnects, and speaks Duet's errors.

Ids and keys are never passed as pymilvus's `ids=` (it renders them as `id in ['...']` without escaping
a quote or backslash) nor paged with its `query_iterator` (same, for the last key): expressions are
always built from `index.milvus.expressions` literals.

`MilvusClient(...)` connects when constructed, so it is only made on the first call that needs it:
the service starts while Milvus is down, and its calls answer `BackendUnavailableError` (HTTP 503)
until Milvus is back. A call that finds Milvus unreachable (connection refused, gRPC UNAVAILABLE or
DEADLINE_EXCEEDED, a timeout) drops the client, so the next call connects afresh (a client whose
server restarted keeps failing otherwise), and is retried once at once if the client was an old one.
A collection the server has not loaded (after a server restart, say) is loaded and the call retried.
Every call carries `timeout=options.timeout_seconds`.

Calls that rewrite the server's alias table (create/alter/drop an alias, drop a collection) run one at a
time per connection: milvus-lite (3.2) saves that table through one shared `aliases.json.tmp` without a
lock, so two at once make one of them fail with `[Errno 2] No such file or directory: ...aliases.json.tmp`
after its change was made in memory. Across processes (two replicas on one milvus-lite server) the lock
cannot help; that error is then taken for what it is (the change was made, the save raced) and a
create/alter is re-sent as an alter, which saves the table again. A Milvus server has no such file.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from index.errors import BackendUnavailableError, CollectionNotFoundError, InvalidCollectionError

logger = logging.getLogger(__name__)


_UNAVAILABLE = re.compile(
    r"unavailable|fail(ed)? (to )?connect|connection refused|deadline|timed? ?out|socket closed|"
    r"connection reset|broken pipe|not ready|channel closed|closed channel|cannot invoke rpc",
    re.IGNORECASE,
)
_ON_A_COLLECTION = {"upsert", "delete", "query", "search", "load_collection", "get_load_state"}
_ALIAS_WRITES = {"create_alias", "alter_alias", "drop_alias", "drop_collection"}
# milvus-lite's unlocked save of its alias table, lost to a concurrent save (see the module docstring).
_LITE_ALIAS_SAVE_RACE = re.compile(r"No such file or directory: .*aliases\.json\.tmp")
_NOT_LOADED = re.compile(r"not loaded|released|call load|load\(\)", re.IGNORECASE)
# "WAL already closed": milvus-lite's answer to a write on a collection being dropped.
_NOT_FOUND = re.compile(
    r"collection.*(not found|not exist|doesn't exist|does not exist)|can't find collection|wal already closed", re.I
)


def redacted(uri: str) -> str:
    """The URI without credentials (for messages and stats)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparsable uri>"
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


def classify(exc: BaseException) -> str | None:
    """'unavailable', 'not_loaded', 'not_found' or None (some other refusal)."""
    try:
        import grpc
    except ImportError:  # pragma: no cover
        grpc = None
    from pymilvus.exceptions import MilvusException, MilvusUnavailableException

    if isinstance(exc, (MilvusUnavailableException, TimeoutError, ConnectionError)):
        return "unavailable"
    if grpc is not None and isinstance(exc, grpc.RpcError):
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            return "unavailable"
    text = str(getattr(exc, "message", "") or exc)
    if isinstance(exc, MilvusException):
        if exc.code == 100 or _NOT_FOUND.search(text):  # (a DescribeCollectionException is one too)
            return "not_found"
        if exc.code == 101 or _NOT_LOADED.search(text):
            return "not_loaded"
    if _UNAVAILABLE.search(text) or _UNAVAILABLE.search(type(exc).__name__):
        return "unavailable"
    return None


def _input_error(exc: BaseException) -> bool:
    """A refusal of what was asked (pymilvus's parameter checks, or the server's input errors)."""
    from pymilvus.exceptions import DataNotMatchException, MilvusException, ParamError

    if isinstance(exc, (ParamError, DataNotMatchException)):
        return True
    return isinstance(exc, MilvusException) and bool(getattr(exc, "_is_input_error", False))


def message(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:300]


class MilvusConnection:
    """One lazily made `MilvusClient` for a backend, shared by its threads."""

    def __init__(self, uri: str, token: str | None, db_name: str | None, timeout: float) -> None:
        self.uri = uri
        self.where = redacted(uri)
        self._token = token
        self._db_name = db_name
        self.timeout = timeout
        self._client: Any = None
        self._lock = threading.Lock()
        self._alias_lock = threading.Lock()  # calls in _ALIAS_WRITES, one at a time (module docstring)

    def unavailable(self, exc: BaseException | str) -> BackendUnavailableError:
        why = exc if isinstance(exc, str) else message(exc)
        return BackendUnavailableError(f"Milvus at {self.where} is unavailable: {why}")

    def client(self) -> tuple[Any, bool]:
        """(the client, whether it was made just now)."""
        with self._lock:
            if self._client is not None:
                return self._client, False
            try:
                from pymilvus import MilvusClient
            except ImportError as exc:  # the milvus extra is not installed
                raise BackendUnavailableError(
                    f"the milvus backend needs pymilvus (pip install duet[milvus]): {exc}"
                ) from None
            # dedicated: pymilvus otherwise shares one connection per address between clients, and one whose
            # recovery failed during an outage stays broken for every client after the server is back.
            kwargs: dict[str, Any] = {"uri": self.uri, "timeout": self.timeout, "dedicated": True}
            if self._token:
                kwargs["token"] = self._token
            if self._db_name:
                kwargs["db_name"] = self._db_name
            if _is_local(self.uri):
                _quiet_embedded_server()
            try:
                self._client = MilvusClient(**kwargs)
            except Exception as exc:
                if _is_local(self.uri) and classify(exc) != "unavailable":
                    raise BackendUnavailableError(_local_open_failure(self.where, exc)) from None
                raise self.unavailable(exc) from None
            return self._client, True

    def reset(self, client: Any) -> None:
        with self._lock:
            if self._client is client:
                self._client = None
        with contextlib.suppress(Exception):
            client.close()

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """`client.<method>(*args, **kwargs)` with the timeout, reconnects and errors described above.
        The first positional argument, when there is one, is the collection the call is about."""
        kwargs.setdefault("timeout", self.timeout)
        if method not in _ALIAS_WRITES:
            return self._call(method, *args, **kwargs)
        with self._alias_lock:
            for attempt in range(3):
                try:
                    return self._call(method, *args, **kwargs)
                except Exception as exc:
                    if not _LITE_ALIAS_SAVE_RACE.search(str(exc)):
                        raise
                    logger.warning("milvus-lite lost a save of its alias table to another process (%s)", method)
                    if method not in ("create_alias", "alter_alias") or attempt == 2:
                        return None  # made in memory; a drop needs no second save (the next one carries it)
                    method = "alter_alias"  # the alias exists now: alter saves the table again
            return None

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        loaded = False
        retried = False
        while True:
            client, fresh = self.client()
            started = time.monotonic()
            try:
                return getattr(client, method)(*args, **kwargs)
            except Exception as exc:
                kind = classify(exc)
                if kind == "unavailable":
                    self.reset(client)
                    # A stale client (its server restarted) fails at once: retry with a fresh one. One that
                    # waited out the timeout is not retried, so an unresponsive server costs one timeout.
                    quick = time.monotonic() - started < self.timeout / 2
                    if not fresh and not retried and quick:
                        retried = True
                        continue
                    raise self.unavailable(exc) from None
                if kind == "not_loaded" and args and not loaded and method != "load_collection":
                    loaded = True
                    self.call("load_collection", args[0])
                    continue
                if kind is None and args and method in _ON_A_COLLECTION and self._gone(args[0]):
                    kind = "not_found"  # dropped under the call (milvus-lite: "WAL already closed")
                if kind is None and _input_error(exc):
                    raise InvalidCollectionError(
                        f"Milvus at {self.where} refused the request: {message(exc)}"
                    ) from None
                if kind == "not_found":
                    raise CollectionNotFoundError(
                        f"Milvus has no collection {args[0] if args else ''}: {message(exc)}"
                    ) from None
                raise

    def _gone(self, collection: str) -> bool:
        try:
            client, _ = self.client()
            return not client.has_collection(collection, timeout=self.timeout)
        except Exception:
            return False

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Map failures of calls made directly on the client (iterators) like `call` does."""
        try:
            yield
        except Exception as exc:
            kind = classify(exc)
            if kind == "unavailable":
                client = self._client
                if client is not None:
                    self.reset(client)
                raise self.unavailable(exc) from None
            if kind == "not_found":
                raise CollectionNotFoundError(f"Milvus collection missing: {message(exc)}") from None
            raise

    def iterate(
        self, collection: str, expr: str, fields: list[str], batch: int = 1000, pk: str = "id"
    ) -> Iterator[list[dict[str, Any]]]:
        """Every row matching `expr` (all rows for ""), `batch` at a time, in primary-key order.

        Not pymilvus's `query_iterator`: it pages with `pk > "<last pk>"` spliced in unescaped, so an id
        holding `"` or `\\` breaks the expression (or changes it). This pages the same way (queries in
        the server's iterator mode, which returns the smallest keys in order), with the last key as an
        escaped literal."""
        from index.milvus.expressions import conjunction, string_literal

        fields = fields if pk in fields else [pk, *fields]
        last: str | None = None
        while True:
            cursor = f"{pk} > {string_literal(last)}" if last is not None else None
            rows = self.call(
                "query",
                collection,
                filter=conjunction(cursor, expr) or f'{pk} != ""',
                output_fields=fields,
                limit=batch,
                iterator="True",
                reduce_stop_for_best="True",
                batch_size=batch,
                consistency_level="Strong",
            )
            if not rows:
                return
            rows = sorted(rows, key=lambda row: row[pk])
            yield rows
            last = rows[-1][pk]

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


def _local_open_failure(where: str, exc: BaseException) -> str:
    """Why milvus-lite embedded could not open its file, in words a user can act on. With the package
    installed, the usual cause is a second process on the same file (milvus-lite locks it: one process
    only; nothing is written, so nothing is damaged)."""
    import importlib.util

    if importlib.util.find_spec("milvus_lite") is None:
        return (
            f"cannot open milvus-lite at {where} (a file path needs the milvus-lite package, "
            f"pip install milvus-lite): {message(exc)}"
        )
    return (
        f"cannot open the milvus-lite database {where}: {message(exc)}. milvus-lite embedded (a file path) serves one "
        "process only: another process (a second replica, or a duet serve still running) most likely holds the "
        "file. Stop it, or share collections between replicas through a Milvus server (`milvus-lite server "
        "--data-dir D --port P`, then DUET_MILVUS_URI=http://host:P on every replica)"
    )


def _is_local(uri: str) -> bool:
    return "://" not in uri


def _unimplemented_rpc(record: logging.LogRecord) -> bool:
    """False for the embedded server's "Method not implemented!" tracebacks (pymilvus asks it for
    AllocTimestamp after creates and alias moves, does without the answer, and gRPC logs an error)."""
    return not (record.exc_info and isinstance(record.exc_info[1], NotImplementedError))


def _quiet_embedded_server() -> None:
    """milvus-lite embedded runs its gRPC server in this process, whose log lines are ours: keep the
    harmless unimplemented-RPC errors out of them (once per process)."""
    server_log = logging.getLogger("grpc._server")
    if _unimplemented_rpc not in server_log.filters:
        server_log.addFilter(_unimplemented_rpc)

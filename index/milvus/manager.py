"""The milvus backend (`index.backend.CollectionBackend`): Duet collections in a Milvus server.

Everything a replica knows about collections is read from Milvus per call (the `{prefix}__meta`
collection, see `index.milvus.meta`), so any number of API replicas share collections: a create,
drop, write or re-embed flip through one is seen by the others at once (strong consistency).

- create: the physical collection `{prefix}_{name}_g{generation}` with its index, loaded, then the
  alias `{prefix}_{name}`, then the config row: the collection exists for every replica once that
  row is written, and a create that fails removes what it made.
- drop: the config row first (gone for every replica at once), then the alias, every generation,
  and the collection's other meta rows.
- re-embed (`index.milvus.reembed`): generation N+1 is built beside N; the flip writes the config row
  (readers' next lookup gets N+1) and moves the alias; N is dropped after a grace.
Constructing the backend never touches Milvus: the service starts while Milvus is down.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, Final

from index.backend import EmbedFn, MilvusOptions
from index.config import CollectionConfig, validate_collection_name
from index.errors import (
    BackendUnavailableError,
    CollectionBusyError,
    CollectionExistsError,
    CollectionNotFoundError,
    CollectionUnavailableError,
    InvalidCollectionError,
    ReembedRefusedError,
)
from index.milvus import names
from index.milvus.client import MilvusConnection, classify, message
from index.milvus.collection import MilvusCollection, now_ms, reembed_running
from index.milvus.meta import Meta
from index.milvus.reembed import MilvusReembedJob
from index.milvus.schema import build_index_params, build_schema, index_type
from index.reembed import busy_message

logger = logging.getLogger(__name__)

# A generation replaced by a re-embed is dropped this long after the flip (requests still on it).
RETIRED_GRACE_SECONDS = 60.0
# Tries of a drop_collection that fails while the collection is still there (another drop removing it).
DROP_ATTEMPTS = 5
# A `creating:<name>` row older than this was left by a replica that died mid-create.
CREATING_STALE_SECONDS = 60.0


def _fresh(at: Any, seconds: float) -> bool:
    """Whether time stamp `at` (ms; from a meta row, so possibly garbage) is less than `seconds` old."""
    if isinstance(at, bool) or not isinstance(at, (int, float)):
        return False
    return now_ms() - int(at) < seconds * 1000


def _readable_status(status: dict[str, Any]) -> bool:
    ints = all(isinstance(status[k], int) and not isinstance(status[k], bool) for k in ("total", "done"))
    strs = all(isinstance(status[k], str) for k in ("target_model", "started_at"))
    optional = all(status[k] is None or isinstance(status[k], str) for k in ("source_model", "error", "finished_at"))
    if status["state"] in ("running", "done", "failed") and ints and strs and optional:
        return True
    logger.warning("milvus: unreadable re-embed record %r", status)
    return False


class MilvusBackend:
    kind: Final = "milvus"

    def __init__(self, options: MilvusOptions) -> None:
        self.options = options
        self.prefix = names.check_prefix(options.prefix)
        self.conn = MilvusConnection(options.uri, options.token, options.db_name, options.timeout_seconds)
        self.meta = Meta(self.conn, self.prefix)
        self._lock = threading.Lock()
        self._name_locks: dict[str, threading.Lock] = {}
        self._jobs: dict[str, MilvusReembedJob] = {}  # re-embeds started by this replica
        self.retired_grace_seconds = RETIRED_GRACE_SECONDS

    # -- lookups ------------------------------------------------------------------------------

    def _config(self, name: str) -> CollectionConfig | None:
        value = self.meta.get(f"config:{name}")
        return self._parse_config(name, value) if value is not None else None

    def _has_config(self, name: str) -> bool:
        """Whether collection `name` exists (its config row is there, readable or not)."""
        return self.meta.get(f"config:{name}") is not None

    @staticmethod
    def _parse_config(name: str, value: Any) -> CollectionConfig:
        """A config row's value; one that does not parse (written by hand, or by another version) makes the
        collection unavailable (503, listed apart with the reason, and droppable), never a 500."""
        try:
            if not isinstance(value, dict) or not value:
                raise ValueError("not a JSON object")
            config = CollectionConfig.from_json(value)
            if config.name != name:
                raise ValueError(f"it names collection {config.name!r}")
            if isinstance(config.generation, bool) or not isinstance(config.generation, int) or config.generation < 0:
                raise ValueError(f"generation {config.generation!r}")
        except Exception as exc:
            raise CollectionUnavailableError(
                f"collection '{name}' cannot be opened: its config row in the Milvus meta collection is "
                f"unreadable ({type(exc).__name__}: {message(exc)}); it can be dropped"
            ) from None
        return config

    def get(self, name: str) -> MilvusCollection:
        validate_collection_name(name)
        config = self._config(name)
        if config is None:
            raise CollectionNotFoundError(f"no collection named '{name}'; GET /v1/collections lists them")
        return MilvusCollection(self, config)

    def listing(self) -> tuple[list[MilvusCollection], dict[str, str]]:
        """(collections whose Milvus collection is there and loadable, {name: why not})."""
        handles, broken = [], {}
        rows = self.meta.rows("config")
        existing = set(self.conn.call("list_collections"))
        for row in sorted(rows, key=lambda r: str(r["key"])):
            name = str(row["key"]).removeprefix("config:")  # (the key is what lookups read)
            try:
                handle = MilvusCollection(self, self._parse_config(name, row["value"]))
            except CollectionUnavailableError as exc:  # a config row this version cannot read
                broken[name] = str(exc)
                continue
            if handle.physical not in existing:
                broken[name] = f"its Milvus collection {handle.physical} is missing on {self.conn.where}"
                continue
            try:
                state = self.conn.call("get_load_state", handle.physical)
                if "NotLoad" in str(state.get("state")):
                    self.conn.call("load_collection", handle.physical)
            except BackendUnavailableError:
                raise
            except Exception as exc:
                broken[name] = f"its Milvus collection {handle.physical} cannot be loaded: {message(exc)}"
                continue
            handles.append(handle)
        return handles, broken

    # -- create / drop ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _name_lock(self, name: str) -> Iterator[None]:
        """Creates and drops of one name through this replica, one at a time."""
        with self._lock:
            lock = self._name_locks.setdefault(name, threading.Lock())
        with lock:
            yield

    def create(self, config: CollectionConfig) -> MilvusCollection:
        """Create whole or not at all. Creates of one name on one replica run one at a time; across
        replicas a `creating:<name>` row (fresh for CREATING_STALE_SECONDS) makes a second create wait its
        turn (CollectionBusyError), and the physical collection's name admits one winner."""
        name = config.name
        if config.modality_gap_correction:
            raise InvalidCollectionError(
                "modality_gap_correction is not available on the milvus backend yet; it is on the faiss backend"
            )
        with self._name_lock(name):
            if self._has_config(name):
                raise CollectionExistsError(f"collection '{name}' already exists")
            creating = self.meta.get(f"creating:{name}")
            if creating is not None and _fresh(creating.get("at"), CREATING_STALE_SECONDS):
                raise CollectionBusyError(f"collection '{name}' is being created by another replica; retry")
            self.meta.put(f"creating:{name}", name, "creating", {"at": now_ms()})
            try:
                return self._create(config)
            finally:
                with contextlib.suppress(Exception):
                    self.meta.delete([f"creating:{name}"])

    def _create(self, config: CollectionConfig) -> MilvusCollection:
        name = config.name
        physical = names.physical(self.prefix, name, config.generation)
        alias = names.alias(self.prefix, name)
        if self.conn.call("has_collection", physical):
            # No config row, no fresh create: left by a create or drop cut short (nothing refers to it).
            logger.warning("milvus: dropping %s, left by a create or drop that was cut short", physical)
            self.conn.call("drop_collection", physical)
        made = False
        try:
            self._create_physical(config, physical)
            made = True
            with contextlib.suppress(CollectionNotFoundError):
                self.conn.call("drop_alias", alias)  # a leftover alias of a create cut short
            self.conn.call("create_alias", physical, alias)
            if self._has_config(name):  # another replica created it meanwhile
                raise CollectionExistsError(f"collection '{name}' already exists")
            self.meta.put(f"config:{name}", name, "config", config.to_json())
        except BaseException:
            if made:
                self._discard(physical, alias if not self._has_config(name) else None)
            raise
        return MilvusCollection(self, config)

    def _create_physical(self, config: CollectionConfig, physical: str) -> None:
        try:
            self.conn.call(
                "create_collection",
                physical,
                schema=build_schema(config),
                index_params=build_index_params(config.index),
                consistency_level="Strong",
            )
        except (BackendUnavailableError, CollectionNotFoundError):
            raise
        except Exception as exc:
            if classify(exc) is not None:
                raise
            if "exist" in str(exc).lower():
                raise CollectionExistsError(f"collection '{config.name}' is being created right now") from None
            with contextlib.suppress(Exception):
                self.conn.call("drop_collection", physical)
            raise InvalidCollectionError(
                f"index kind {config.index.kind!r} ({index_type(config.index)}) cannot be built by the Milvus "
                f"server at {self.conn.where}: {message(exc)}"
            ) from None
        self.conn.call("load_collection", physical)

    def _discard(self, physical: str, alias: str | None) -> None:
        with contextlib.suppress(Exception):
            if alias is not None:
                self.conn.call("drop_alias", alias)
        with contextlib.suppress(Exception):
            self.conn.call("drop_collection", physical)

    def drop(self, name: str) -> None:
        validate_collection_name(name)
        with self._name_lock(name):
            self._drop(name)

    def _drop(self, name: str) -> None:
        if not self._has_config(name):
            raise CollectionNotFoundError(f"no collection named '{name}'; GET /v1/collections lists them")
        self._refuse_while_reembedding(name)
        self.meta.delete([f"config:{name}"])  # gone for every replica from here
        self._drop_alias(names.alias(self.prefix, name))
        for physical in self._generations(name):
            self._drop_physical(physical)
        self.meta.delete_collection(name)
        with self._lock:
            self._jobs.pop(name, None)

    def _refuse_while_reembedding(self, name: str) -> None:
        """A drop or a second re-embed waits for a running re-embed (on any replica: its meta row)."""
        state = self.meta.get(f"reembed:{name}")
        if reembed_running(state):
            assert state is not None
            raise CollectionBusyError(
                busy_message(name, state.get("target_model"), state.get("done", 0), state.get("total", 0))
            )

    def _drop_alias(self, alias: str) -> None:
        """Drop an alias another replica may be dropping too (a missing alias is no failure: nothing
        reads through it, and a create replaces a leftover one)."""
        try:
            self.conn.call("drop_alias", alias)
        except BackendUnavailableError:
            raise
        except Exception as exc:
            logger.info("milvus: alias %s not dropped (%s)", alias, message(exc))

    def _drop_physical(self, physical: str) -> None:
        """Drop a Milvus collection that may be dropped by another replica at the same moment (two drops
        of one name, a drop racing the grace drop of a retired generation): a failure is only a failure if
        the collection is still there afterwards (milvus-lite answers a drop that lost the race with a
        bare "No such file or directory")."""
        for attempt in range(DROP_ATTEMPTS):
            try:
                self.conn.call("drop_collection", physical)
                return
            except BackendUnavailableError:
                raise
            except CollectionNotFoundError:
                return
            except Exception as exc:
                # ... or "Directory not empty" while the other drop is still removing it: wait for that one
                if not self.conn.call("has_collection", physical):
                    logger.info("milvus: %s was dropped by someone else meanwhile", physical)
                    return
                failure = message(exc)
            time.sleep(0.2 * (attempt + 1))
        raise CollectionBusyError(f"Milvus collection {physical} could not be dropped ({failure}); retry the drop")

    def _generations(self, name: str) -> list[str]:
        return [c for c in self.conn.call("list_collections") if names.generation_of(self.prefix, name, c) is not None]

    # -- re-embedding -------------------------------------------------------------------------

    def start_reembed(self, config: CollectionConfig, embed: EmbedFn) -> MilvusReembedJob:
        """Rebuild collection `config.name` as `config` (another model) into generation N+1, in a thread.
        Writes are refused on every replica (the `reembed` meta row) until it ends. On one replica, starts of
        one name run one at a time; across replicas (Milvus has no compare-and-set) each start reads its
        re-embed row back after a settle (`MilvusReembedJob.claim`) and only the job whose token is there goes
        on. (A start whose first write is delayed past the other's read-back could still slip through.)"""
        with self._name_lock(config.name):
            return self._start_reembed(config, embed)

    def _start_reembed(self, config: CollectionConfig, embed: EmbedFn) -> MilvusReembedJob:
        name = config.name
        source = self.get(name)
        self._refuse_while_reembedding(name)
        if source.config.model == config.model:
            raise ReembedRefusedError(f"collection '{name}' already holds vectors of {config.model}")
        if config.modality_gap_correction:
            raise InvalidCollectionError(
                "modality_gap_correction is not available on the milvus backend yet; it is on the faiss backend"
            )
        target = replace(config, generation=source.config.generation + 1)
        job = MilvusReembedJob(self, source, target, embed)
        job.freeze()  # writes refused on every replica from here
        job.claim()  # a re-embed another replica started at the same moment: one of the two goes on
        try:
            self._check_reembeddable(source, target)
        except BaseException:
            job.unfreeze_refused()
            raise
        with self._lock:
            self._jobs[name] = job
        job.start()
        return job

    @staticmethod
    def _check_reembeddable(source: MilvusCollection, config: CollectionConfig) -> None:
        bare = source.count_without_content()
        if bare:
            raise ReembedRefusedError(
                f"{bare} items of collection '{source.name}' were stored as vectors, without the text or image "
                "they came from, so they cannot be embedded again; delete them or re-create the collection"
            )
        missing = [m for m in source.modality_counts() if m not in config.modalities]
        if missing:
            raise ReembedRefusedError(
                f"collection '{source.name}' holds {', '.join(missing)} items, which {config.model} does not "
                f"embed (it embeds {', '.join(config.modalities)})"
            )

    def flip(self, job: MilvusReembedJob) -> None:
        """Make the finished generation current: the config row (every replica's next lookup), then the
        alias; the old generation is recorded for dropping after the grace."""
        name = job.config.name
        if not self._has_config(name):
            raise CollectionNotFoundError(f"collection '{name}' was dropped during its re-embed")
        old = job.source.physical
        self.meta.put_many(
            [
                (f"config:{name}", name, "config", job.config.to_json()),
                (f"retired:{name}:{job.source.config.generation}", name, "retired", {"physical": old, "at": now_ms()}),
            ]
        )
        self.conn.call("alter_alias", job.target_physical, names.alias(self.prefix, name))

    def reembed_status(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get(name)
        if job is not None:
            return job.progress.as_dict()
        state = self.meta.get(f"reembed:{name}")  # one another replica ran
        if state is None:
            return None
        status = {k: state.get(k) for k in MilvusReembedJob.PROGRESS_KEYS}
        if not _readable_status(status):
            return None  # (logged) an unreadable record says nothing about a re-embed
        if status["state"] == "running" and not reembed_running(state):
            status["state"] = "failed"
            status["error"] = "the replica running it stopped (no heartbeat)"
        return status

    # -- upkeep -------------------------------------------------------------------------------

    def open_all(self) -> None:
        """Create the meta collection if needed; with Milvus down, log and start anyway."""
        try:
            self.meta.ensure()
        except BackendUnavailableError as exc:
            logger.warning("milvus backend: %s; collections answer 503 until it is reachable", exc)

    def snapshot_dirty(self) -> list[str]:
        """Drop generations replaced by a re-embed more than the grace ago; returns what was dropped."""
        done: list[str] = []
        try:
            rows = self.meta.rows("retired")
        except BackendUnavailableError:
            return done
        for row in rows:
            value = row["value"] if isinstance(row.get("value"), dict) else {}
            if not isinstance(value.get("physical"), str) or not isinstance(value.get("at"), (int, float)):
                logger.warning("milvus: unreadable retired row %r left as it is", row.get("key"))
                continue
            if _fresh(value["at"], self.retired_grace_seconds):
                continue
            try:
                self._drop_physical(value["physical"])
                self.meta.delete([row["key"]])
            except (BackendUnavailableError, CollectionNotFoundError):
                continue
            done.append(value["physical"])
        return done

    def close(self) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel()
        self.conn.close()

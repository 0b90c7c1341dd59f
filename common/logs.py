"""Logging for every Duet process: one JSON object per line (or plain text), with the request id.

The service, the job worker and the training process all configure logging here, so a
request's id reaches every line it causes: the service binds it per request (a contextvar,
so concurrent requests never mix), the job record carries it to the worker, and the worker
hands it to the training process it spawns. This module is a stdlib-only leaf: `service`,
`jobs` and the CLI import it without pulling anything else in.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import io
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from pathlib import Path
from typing import Any

LOG_FORMATS = ("auto", "json", "text")
MAX_REQUEST_ID = 128

# Fields bound to the current request or job; read when a line is formatted. A mapping that
# is replaced (never mutated), so a copied context never sees another task's changes.
_context: ContextVar[dict[str, Any]] = ContextVar("duet_log_context", default={})  # noqa: B039 - never mutated

# Attributes every LogRecord has: whatever else a record carries came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._:/+=@-]")


def bind(**fields: Any) -> Token[dict[str, Any]]:
    """Add fields to every line logged from this context on; `unbind(token)` undoes it."""
    return _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})


def unbind(token: Token[dict[str, Any]]) -> None:
    _context.reset(token)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def context_fields() -> dict[str, Any]:
    return _context.get()


def current_request_id() -> str | None:
    return _context.get().get("request_id")


def clean_request_id(raw: str | None) -> str:
    """A client's X-Request-ID made safe to log and echo (no spaces, quotes or control
    characters, at most 128 characters), or a new id when it has nothing usable."""
    cleaned = _UNSAFE.sub("", raw or "")[:MAX_REQUEST_ID]
    return cleaned or uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the bound context (request_id,
    job_id, key, ...), any `extra=` fields, and the traceback as `exc_info` when there is one.
    `fields` are on every line whatever the context (a training process runs one job: its id
    must reach lines logged from threads, which start with an empty context)."""

    def __init__(self, fields: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.fields = {k: v for k, v in (fields or {}).items() if v is not None}

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(self.fields)
        line.update(_context.get())
        for name, value in vars(record).items():
            if name not in _STANDARD and not name.startswith("_"):
                line[name] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = record.stack_info
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, plus `[request_id]` when a request or job is bound."""

    def __init__(self, fields: dict[str, Any] | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.fields = fields or {}

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = _context.get().get("request_id") or self.fields.get("request_id")
        return f"{text} [{request_id}]" if request_id else text


def _timestamp(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def resolve_format(log_format: str) -> str:
    """'auto' is text on a terminal (people read it) and JSON otherwise (log shippers parse it)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    if log_format == "auto":
        return "text" if sys.stderr.isatty() else "json"
    return log_format


def formatter(log_format: str, fields: dict[str, Any] | None = None) -> logging.Formatter:
    return JsonFormatter(fields) if resolve_format(log_format) == "json" else TextFormatter(fields)


def setup_logging(
    level: str = "info", log_format: str = "auto", file: Path | None = None, fields: dict[str, Any] | None = None
) -> None:
    """Configure the root logger (stderr, and `file` when given) for a Duet process; replaces
    handlers a previous call installed, so it can be called again with other settings.

    With JSON lines, the libraries' own output joins them: progress bars are turned off (for
    this process and those it starts), MLflow is told not to install its handler, warnings
    become log records, and libraries already imported are adopted (`adopt_library_loggers`)."""
    chosen = formatter(log_format, fields)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.__stderr__ or sys.stderr)]
    if file is not None:
        handlers.append(logging.FileHandler(file))
    for handler in handlers:
        handler.setFormatter(chosen)
    logging.basicConfig(level=level.upper(), handlers=handlers, force=True)
    if isinstance(chosen, JsonFormatter):
        for name, value in QUIET_LIBRARIES_ENV.items():
            os.environ.setdefault(name, value)
        logging.captureWarnings(True)
        adopt_library_loggers()
        _adopt_after_import("transformers.utils.logging")  # imported later (models load on demand)


# Read by the libraries when they are imported (or when a bar starts), here and in children.
QUIET_LIBRARIES_ENV = {
    "TQDM_DISABLE": "1",  # tqdm's bars (transformers' "Loading weights", sentence-transformers)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_CONFIGURE_LOGGING": "false",  # MLflow's own stderr handler, plain text
}


def adopt_library_loggers() -> None:
    """Route libraries' log records through the root logger's handlers (Duet's format).

    MLflow, transformers and alembic attach their own stderr handlers and stop propagation,
    so their lines bypass ours. Call again after importing such a library: the service does
    once start-up has imported them. A file handler a library set up is left alone."""
    ours = set(logging.getLogger().handlers)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger):
            continue
        for handler in list(logger.handlers):
            if handler in ours or isinstance(handler, logging.FileHandler):
                continue
            if isinstance(handler, logging.StreamHandler):
                logger.removeHandler(handler)
                logger.propagate = True
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:  # its module keeps the handler too, and re-adds it if it sees none
        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()
        transformers_logging.disable_progress_bar()


class _AdoptAfterImport(importlib.abc.MetaPathFinder):
    """Runs `adopt_library_loggers` right after one module is imported: transformers installs
    its stderr handler at import, which may come after logging was set up (a model loaded on
    demand, the training process importing the trainer)."""

    def __init__(self, module: str) -> None:
        self.module = module

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.module:
            return None
        sys.meta_path.remove(self)  # once, and so the real finders answer the call below
        spec = importlib.util.find_spec(fullname)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_adopt(module: Any) -> None:
            exec_module(module)
            adopt_library_loggers()

        loader.exec_module = exec_then_adopt  # type: ignore[method-assign]
        return spec


def _adopt_after_import(module: str) -> None:
    if module in sys.modules:
        return
    if not any(isinstance(finder, _AdoptAfterImport) and finder.module == module for finder in sys.meta_path):
        sys.meta_path.insert(0, _AdoptAfterImport(module))


class JsonLinesStream(io.TextIOBase):
    """A stand-in for stdout/stderr that keeps the stream JSON lines: a line that is already a
    JSON object passes through, any other line (a library's print, a stray progress bar) is
    wrapped as `{"logger": "stdout" | "stderr", "message": ...}`. Writes through the original
    stream, whose file descriptor it reports (faulthandler, subprocesses)."""

    def __init__(self, stream: Any, name: str) -> None:
        super().__init__()
        self.stream = stream
        self.name = name
        self._pending = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        fd: int = self.stream.fileno()
        return fd

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._pending = re.split(r"[\r\n]", self._pending + text)
            for line in lines:
                if line.strip():
                    self.stream.write(self._as_json(line) + "\n")
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self.stream.flush()

    def _as_json(self, line: str) -> str:
        if line.startswith("{"):
            try:
                if isinstance(json.loads(line), dict):
                    return line
            except ValueError:
                pass
        record = logging.LogRecord(self.name, logging.INFO, "", 0, line.rstrip(), None, None)
        return JsonFormatter().format(record)


def capture_stray_output() -> None:
    """JSON lines only, even from code that prints: wrap sys.stdout and sys.stderr (once).
    For `duet serve` and `duet worker` with JSON logs; never in a test process."""
    if not isinstance(sys.stdout, JsonLinesStream):
        sys.stdout = JsonLinesStream(sys.stdout, "stdout")
    if not isinstance(sys.stderr, JsonLinesStream):
        sys.stderr = JsonLinesStream(sys.stderr, "stderr")

"""`duet`: serve, and inspect or change the model registry.

Heavy imports (torch, sentence-transformers, MLflow, FastAPI) happen inside the commands,
so `duet --help` answers at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated

import typer

from duet.config_cli import config_reference
from duet.index_cli import index_app
from duet.keys_cli import keys_app
from duet.optimize_cli import optimize

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}  # subcommands inherit it from the group

app = typer.Typer(
    help="Duet: fine-tune contrastive encoders and serve them.", no_args_is_help=True, context_settings=HELP_OPTIONS
)
models_app = typer.Typer(help="Inspect and change the model registry.", no_args_is_help=True)
app.add_typer(models_app, name="models")
models_app.command("optimize")(optimize)
app.add_typer(index_app, name="index")
app.add_typer(keys_app, name="keys")
app.command("config-reference")(config_reference)

DataDir = Annotated[Path | None, typer.Option(help="State folder (default: $DUET_DATA_DIR or ./duet-data).")]


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"duet {version('duet')}")
        except PackageNotFoundError:
            typer.echo("duet (not installed)")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Duet: fine-tune contrastive encoders and serve them."""


def _fail(message: str, code: int = 1) -> typer.Exit:
    """One line on stderr, no traceback: what a user can act on (a JSON error line when the
    process writes JSON lines)."""
    import logging
    import sys

    from common.logs import JsonFormatter, JsonLinesStream

    if isinstance(sys.stderr, JsonLinesStream):
        record = logging.LogRecord("duet", logging.ERROR, "", 0, message, None, None)
        sys.stderr.write(JsonFormatter().format(record) + "\n")
    else:
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _settings(data_dir: Path | None = None, **overrides):
    from pydantic import ValidationError

    from service.settings import Settings

    values = {k: v for k, v in overrides.items() if v is not None}
    if data_dir is not None:
        values["data_dir"] = data_dir
    try:
        return Settings(**values)
    except ValidationError as exc:  # one line naming each variable, not pydantic's report
        problems = "; ".join(
            f"DUET_{'_'.join(str(part) for part in error['loc']).upper() or 'SETTINGS'}: {error['msg']}"
            for error in exc.errors()
        )
        raise _fail(f"invalid settings: {problems}", code=2) from None


def _setup_logging(level: str, log_format: str = "auto", capture: bool = False) -> None:
    """JSON lines or text (DUET_LOG_FORMAT; 'auto': text on a terminal), with request ids.
    `capture`: with JSON lines, whatever else the process prints becomes a JSON line too."""
    from common.logs import capture_stray_output, resolve_format, setup_logging

    setup_logging(level, log_format)
    if capture and resolve_format(log_format) == "json":
        capture_stray_output()


def _hold_data_dir(data_dir: Path):
    """The data-dir lock for this process's lifetime (the kernel drops it when we exit)."""
    from common.lifetime import DataDirError, hold_data_dir

    try:
        return hold_data_dir(data_dir)
    except DataDirError as exc:
        raise _fail(str(exc)) from None


def _listen(host: str, port: int):
    """Bind the port before start-up, so a busy port is one line at once, not an error after
    models loaded and a local worker started; uvicorn then serves on this very socket."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise _fail(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} (another server on that port? "
            "set DUET_PORT or --port)"
        ) from None
    return sock


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    data_dir: DataDir = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
) -> None:
    """Start the HTTP service (registers the default models on first start).

    One server per data dir with the faiss collections backend: a second one is refused with the
    first one's pid. With DUET_COLLECTIONS_BACKEND=milvus, replicas may share a data dir."""
    import logging

    settings = _settings(data_dir, host=host, port=port, log_level=log_level)
    _setup_logging(settings.log_level, settings.log_format, capture=True)
    problem = settings.missing_backend_package()
    if problem:
        raise _fail(problem)
    if settings.holds_data_dir_lock:  # the faiss backend's one writer; milvus replicas share a data dir
        _hold_data_dir(settings.data_dir)  # before the port: a second server names the first
    sock = _listen(settings.host, settings.port)

    import uvicorn

    from service.app import create_app

    config = uvicorn.Config(
        create_app(settings),
        log_level=settings.log_level,
        log_config=None,  # uvicorn's lines go through Duet's handlers (JSON or text)
        access_log=False,  # Duet writes the access line itself, with the request id and key name
        timeout_graceful_shutdown=10,
    )
    scheme_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    logging.getLogger("duet.serve").info(
        "serving http://%s:%d once start-up completes", scheme_host, sock.getsockname()[1]
    )
    server = uvicorn.Server(config)
    with suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    if not server.started:
        raise typer.Exit(3)  # start-up failed (logged above); uvicorn's own exit code for it


@app.command()
def worker(
    data_dir: DataDir = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis of the service (default: $REDIS_URL or $DUET_REDIS_URL).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Worker name in job records (default: host-pid).")] = None,
    embedded: Annotated[
        bool, typer.Option(help="Use the SQLite job store under the data dir (what `duet serve` starts).")
    ] = False,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    parent_pid: Annotated[
        int | None, typer.Option(hidden=True, help="Exit when this process (the server that started us) ends.")
    ] = None,
) -> None:
    """Run fine-tuning jobs from the queue, one at a time, each in a spawned training process.

    Start any number, on any machines that share the data dir (checkpoints, uploaded datasets)
    and reach the same Redis and registry. SIGTERM stops the running job at its next step
    (after a checkpoint; the job is left failed and resumable) and exits.
    """
    import signal

    from jobs.redis_store import RedisJobStore
    from jobs.sqlite_store import SqliteJobStore
    from jobs.worker import Worker, WorkerOptions

    settings = _settings(data_dir, log_level=log_level)
    _setup_logging(settings.log_level, settings.log_format, capture=True)
    url = redis_url or settings.redis_url
    _writable(settings.data_dir)  # checkpoints and training runs go there
    if embedded:
        _beside_a_server(settings.data_dir, parent_pid)
        store = SqliteJobStore(settings.jobs_db)
    elif url:
        store = RedisJobStore(url, prefix=settings.redis_prefix)
    else:
        typer.secho(
            "error: no Redis to take jobs from: set REDIS_URL (or --redis-url); `duet serve` runs jobs itself "
            "when it has no Redis",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2)
    options = WorkerOptions(
        data_dir=settings.data_dir.resolve(),
        registry_dir=settings.registry_dir.resolve(),
        registry_uri=settings.registry_uri,
        artifact_uri=settings.artifact_uri,
        heartbeat_seconds=settings.job_heartbeat_seconds,
        cancel_grace_seconds=settings.job_cancel_grace_seconds,
        allow_local_paths=settings.jobs_allow_local_paths,
    )
    if name:
        options.name = name
    runner = Worker(store, options)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: runner.stopping.set())
    runner.run_forever()
    store.close()


def _beside_a_server(data_dir: Path, parent_pid: int | None) -> None:
    """An embedded worker works for the server holding the data dir, and dies with it: a
    worker of a killed server must not keep writing beside the next one. Started by the
    server (`parent_pid`): SIGKILL when it ends. Started by hand: only while a server holds
    the data dir, and killed when that server ends."""
    from common.lifetime import exit_with_parent, exit_with_process, server_pid

    if parent_pid is not None:
        exit_with_parent(parent_pid)
        return
    path = data_dir.expanduser().resolve()
    pid = server_pid(path)
    if pid is None:
        raise _fail(
            f"no `duet serve` holds the data dir {path}: an embedded worker runs beside its server "
            "(start `duet serve`, which starts one itself)"
        )
    if pid > 0:
        exit_with_process(pid)


def _writable(data_dir: Path) -> None:
    """An unwritable data dir is one line naming it and DUET_DATA_DIR, not a library's traceback."""
    from common.lifetime import DataDirError, check_writable

    try:
        check_writable(data_dir)
    except DataDirError as exc:
        raise _fail(str(exc)) from None


@contextmanager
def _user_errors() -> Iterator[None]:
    """Registry and model errors are the user's to fix: one line, exit code 1, no traceback."""
    from encoders.errors import EncoderError
    from registry.errors import RegistryError

    try:
        yield
    except (RegistryError, EncoderError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


def _registry(data_dir: Path | None):
    from service.bootstrap import register_default_models
    from service.state import open_registry

    settings = _settings(data_dir)
    _writable(settings.data_dir)
    registry = open_registry(settings)
    if settings.register_default_models:
        register_default_models(registry, settings.data_dir)
    return registry


@app.command()
def train(
    config: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Training config (YAML or JSON).")],
    data_dir: DataDir = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run's last checkpoint if there is one.")] = True,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
) -> None:
    """Fine-tune a model as CONFIG says, evaluate before and after, register the result.

    Several processes: `torchrun --nproc_per_node N --no-python duet train CONFIG`.
    """
    from trainer.config import ConfigError
    from trainer.tables import RowError

    _setup_logging(log_level)
    try:
        from trainer.run import train_from_file

        settings = _settings(data_dir)
        with _user_errors():
            registry = _registry(data_dir)
            result = train_from_file(config, runs_dir=settings.data_dir / "runs", registry=registry, resume=resume)
    except (ConfigError, RowError) as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    if result.report:
        typer.echo(result.report)
    if result.version is not None:
        typer.echo(f"registered {result.version.ref} (aliases: {', '.join(result.version.aliases) or 'none'})")
    if result.promotion is not None:
        typer.echo(f"promotion: {result.promotion.reason}")


data_app = typer.Typer(help="Datasets that ship with Duet.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("synthetic")
def synthetic(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write images/, train.jsonl, test.jsonl into.")],
    n_train: Annotated[int, typer.Option(help="Training images.")] = 2000,
    n_test: Annotated[int, typer.Option(help="Test images (unseen colour-shape combinations).")] = 500,
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.")] = 0,
) -> None:
    """Generate the synthetic captioned-shapes set (no download)."""
    from trainer.synthetic import SyntheticSpec, generate

    result = generate(out_dir, SyntheticSpec(n_train=n_train, n_test=n_test, seed=seed))
    typer.echo(f"wrote {result}")


@models_app.command("list")
def list_models(data_dir: DataDir = None) -> None:
    """Registered models with their latest version and aliases."""
    with _user_errors():
        summaries = _registry(data_dir).list_models()
    for summary in summaries:
        aliases = ", ".join(f"{a}->{v}" for a, v in sorted(summary.aliases.items())) or "-"
        typer.echo(f"{summary.name:24} latest={summary.latest_version}  aliases: {aliases}")


@models_app.command("show")
def show(ref: str, data_dir: DataDir = None) -> None:
    """The manifest of the version REF resolves to (name, name@alias or name/version)."""
    with _user_errors():
        info = _registry(data_dir).resolve(ref)
    typer.echo(
        json.dumps(
            {
                "ref": info.ref,
                "aliases": list(info.aliases),
                "path": str(info.path),
                **info.manifest.model_dump(mode="json"),
            },
            indent=2,
        )
    )


@models_app.command("register")
def register(
    path: Annotated[Path, typer.Argument(help="A saved sentence-transformers model folder.")],
    name: Annotated[str, typer.Option(help="Model name in the registry.")],
    alias: Annotated[list[str] | None, typer.Option(help="Alias to point at the new version (repeatable).")] = None,
    description: Annotated[str, typer.Option(help="What this version is.")] = "",
    trained: Annotated[bool, typer.Option(help="Whether every part of the model is trained.")] = True,
    data_dir: DataDir = None,
) -> None:
    """Register a model folder as the next version of NAME."""
    from encoders.encoder import describe, load_sentence_transformer
    from encoders.provenance import code_version, library_versions
    from registry.manifest import Lineage, Manifest

    with _user_errors():
        contract = describe(load_sentence_transformer(path))
    manifest = Manifest(
        contract=contract,
        trained=trained,
        description=description,
        lineage=Lineage(base_model=str(path), code_version=code_version(), library_versions=library_versions()),
    )
    with _user_errors():
        info = _registry(data_dir).register(name, path, manifest, aliases=tuple(alias or ()))
    typer.echo(f"registered {info.ref} ({contract.dimension}-d, {', '.join(contract.modalities)})")


@models_app.command("alias")
def set_alias(
    name: str,
    alias: str,
    version: int,
    require_compatible: Annotated[
        bool,
        typer.Option(
            help="Move only if VERSION holds ALIAS already or is registered compatible with its holder "
            "(collections pinned to the holder stay searchable)."
        ),
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """Point ALIAS of model NAME at VERSION."""
    with _user_errors():
        _registry(data_dir).set_alias(name, alias, version, require_compatible=require_compatible)
    typer.echo(f"{name}@{alias} -> {name}/{version}")


if __name__ == "__main__":  # `python -m duet.cli`: how `duet serve` starts its local worker
    app()

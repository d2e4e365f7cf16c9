"""``loraplex`` command: serve | migrate | worker | admin create-key | admin vacuum.

Settings come from ``LORAPLEX_*`` variables; flags override the few that matter per command.
A start that cannot work (a bad setting, an unwritable data dir, a missing model, a port in
use, ...) is refused before anything is written: one line per problem on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import ValidationError

from service.config import (
    DEFAULT_TENANT_NAME,
    Settings,
    env_file,
    settings_errors,
    unknown_variables,
)
from service.preflight import (
    StartupError,
    bind_listener,
    check_bases,
    check_database,
    check_listen_database,
    check_schema,
    check_writable_dir,
    database_variable,
)

if TYPE_CHECKING:
    import uvicorn
    from starlette.types import ASGIApp

logger = logging.getLogger(__name__)

DISTRIBUTION = "loraplex"
# As for argparse's usage errors: the invocation or its configuration is wrong.
EXIT_STARTUP_ERROR = 2


def _settings(**flags: tuple[str, object]) -> Settings:
    """Settings from the environment, overridden by ``flags``: setting → (flag, value or None)."""
    values = {name: value for name, (_, value) in flags.items() if value is not None}
    try:
        # The embedded worker inherits the API process's environment: the parent warned
        # already.
        if "LORAPLEX_PARENT_PID" not in os.environ:
            for warning in unknown_variables(os.environ, env_file()):
                print(f"loraplex: warning: {warning}", file=sys.stderr)
        return Settings(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        given = {name: flag for name, (flag, value) in flags.items() if value is not None}
        raise StartupError("\n".join(settings_errors(exc, given))) from None
    except (UnicodeDecodeError, OSError) as exc:  # the .env file, read by both of the above
        raise StartupError(
            f"{env_file()}: cannot read the settings file ({exc}); save it as UTF-8 "
            "text this user can read, or remove it"
        ) from None


def _url_variable(url: str | None, settings: Settings) -> str:
    """What set ``settings.db_url``: ``--url`` when given (even empty), else the variable."""
    return "--url" if url is not None else database_variable(settings)


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def uvicorn_config(app: ASGIApp, settings: Settings) -> uvicorn.Config:
    """How ``serve`` runs ``app``: uvicorn's logging, with credentials kept out of its
    access log."""
    import uvicorn

    from service.observability.logs import redact_access_log

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower()
    )
    # After Config: it (re)configures uvicorn's loggers.
    admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
    redact_access_log([admin_key] if admin_key else [])
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.main import create_app
    from service.state import app_state

    settings = _settings(host=("--host", args.host), port=("--port", args.port))
    check_writable_dir(settings.data_dir, "LORAPLEX_DATA_DIR")  # the first key file goes there
    check_database(settings.db_url, database_variable(settings))
    check_schema(settings.db_url, database_variable(settings))
    if settings.listen_database_url:
        check_listen_database(settings.listen_database_url)
    listener = bind_listener(settings.host, settings.port)
    try:
        check_bases(settings)
        _setup_logging(settings.log_level)
        app = create_app(settings)
    except BaseException:
        listener.close()
        raise
    # One process: the serving model, batcher and embedded worker live in this process, so
    # uvicorn workers > 1 would load everything N times.
    server = uvicorn.Server(uvicorn_config(app, settings))
    # Long-lived responses (job event streams) watch server.should_exit and end themselves:
    # uvicorn waits for open responses before it shuts the app (and its worker) down.
    app_state(app).uvicorn_server = server
    # uvicorn logs its address only when it binds the socket itself.
    logger.info(
        "listening on http://%s:%d; requests are answered once start-up completes",
        settings.host,
        settings.port,
    )
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[listener])
    return 0 if server.started else 3  # 3: uvicorn's start-up failure code


def cmd_migrate(args: argparse.Namespace) -> int:
    from service.db.migrate import current_revision, upgrade

    settings = _settings(database_url=("--url", args.url))
    variable = _url_variable(args.url, settings)
    check_database(settings.db_url, variable)
    check_schema(settings.db_url, variable)
    _setup_logging(settings.log_level)
    upgrade(settings.db_url)
    print(f"database at revision {current_revision(settings.db_url)}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    if args.check:
        # Before anything heavy is imported: a container runs this every few seconds.
        from service.worker.health import check

        settings = _settings()
        # The URL only: a server that does not answer is the check's to report (unhealthy).
        check_database(settings.db_url, database_variable(settings), connect=False)
        return check(settings, worker_id=args.worker_id)

    from service.worker.runner import run_worker

    settings = _settings()
    check_database(settings.db_url, database_variable(settings))
    check_schema(settings.db_url, database_variable(settings))
    check_bases(settings)
    _setup_logging(settings.log_level)
    return run_worker(settings, worker_id=args.worker_id)


def _check_names(args: argparse.Namespace) -> None:
    """The tenant and key names follow the rules the API's admin routes apply to them."""
    from service.api.schemas.tenants import ApiKeyCreate, TenantCreate

    checks = (("--tenant", TenantCreate, args.tenant), ("--name", ApiKeyCreate, args.name))
    for flag, schema, value in checks:
        try:
            schema(name=value)
        except ValidationError as exc:
            # repr: a control character in the value must not break the line.
            raise StartupError(f"{flag} {value!r}: {exc.errors()[0]['msg']}") from None


def cmd_create_key(args: argparse.Namespace) -> int:
    from service.db.migrate import upgrade
    from service.db.session import make_db_engine, make_sessionmaker
    from service.tenants.keys import create_api_key, create_tenant, tenant_by_name

    _check_names(args)
    settings = _settings(database_url=("--url", args.url))
    variable = _url_variable(args.url, settings)
    check_database(settings.db_url, variable)
    check_schema(settings.db_url, variable)
    upgrade(settings.db_url)
    db_engine = make_db_engine(settings.db_url)
    try:
        with make_sessionmaker(db_engine)() as session:
            tenant = tenant_by_name(session, args.tenant)
            if tenant is None:
                tenant = create_tenant(session, args.tenant)
                print(f"created tenant {args.tenant!r} ({tenant.id})", file=sys.stderr)
            new_key = create_api_key(session, tenant, is_admin=args.admin, name=args.name)
            session.commit()
            kind = "admin key" if args.admin else "key"
            print(f"{kind} {new_key.row.id} for tenant {tenant.name!r}:", file=sys.stderr)
    finally:
        db_engine.dispose()
    # The secret alone on stdout, so `KEY=$(loraplex admin create-key)` works.
    print(new_key.secret)
    return 0


def cmd_vacuum(args: argparse.Namespace) -> int:
    from sqlalchemy.engine import make_url

    from service.db.session import make_db_engine, sqlite_file, vacuum
    from service.storage_quota import format_bytes

    settings = _settings(database_url=("--url", args.url))
    variable = _url_variable(args.url, settings)
    check_database(settings.db_url, variable)
    path = sqlite_file(make_url(settings.db_url))
    if path is not None and not path.is_file():
        # Opening it would create an empty database (and its folder) only to vacuum it.
        raise StartupError(f"{variable}: no database at {path}; nothing to vacuum")
    check_schema(settings.db_url, variable)
    db_engine = make_db_engine(settings.db_url)
    before = path.stat().st_size if path is not None else 0
    try:
        vacuum(db_engine)
    finally:
        db_engine.dispose()
    if path is not None:
        print(f"{path}: {format_bytes(before)} -> {format_bytes(path.stat().st_size)}")
    else:
        print("vacuumed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP API (and the embedded worker)")
    serve.add_argument("--host", help="bind address (LORAPLEX_HOST)")
    serve.add_argument("--port", type=int, help="port (LORAPLEX_PORT)")
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="upgrade the database schema to the latest")
    migrate.add_argument("--url", help="database URL (LORAPLEX_DATABASE_URL)")
    migrate.set_defaults(func=cmd_migrate)

    worker = sub.add_parser("worker", help="run a standalone training worker")
    worker.add_argument("--worker-id", help="lease owner name (default: host:pid)")
    worker.add_argument(
        "--check",
        action="store_true",
        help="exit 0 if this worker (--worker-id, else any on this host) sent a heartbeat "
        "within LORAPLEX_LEASE_SECONDS, else 1 with one line saying why; starts no worker",
    )
    worker.set_defaults(func=cmd_worker)

    admin = sub.add_parser("admin", help="administration")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    create_key = admin_sub.add_parser("create-key", help="create an API key (prints it)")
    create_key.add_argument("--tenant", default=DEFAULT_TENANT_NAME, help="tenant name")
    create_key.add_argument("--admin", action="store_true", help="may manage tenants")
    create_key.add_argument("--name", help="a label for the key")
    create_key.add_argument("--url", help="database URL (LORAPLEX_DATABASE_URL)")
    create_key.set_defaults(func=cmd_create_key)
    vacuum = admin_sub.add_parser(
        "vacuum", help="give the space of deleted data back to the file system (one-off)"
    )
    vacuum.add_argument("--url", help="database URL (LORAPLEX_DATABASE_URL)")
    vacuum.set_defaults(func=cmd_vacuum)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before torch loads: OpenMP's default spin-waiting makes threads fight over shared cores
    # (2-thread forward passes measured 2-30x slower than 1 thread here); passive waiting not.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except StartupError as exc:
        for line in str(exc).splitlines():
            print(f"loraplex: {line}", file=sys.stderr)
        return EXIT_STARTUP_ERROR


if __name__ == "__main__":
    raise SystemExit(main())

"""``loraplex`` command: serve | migrate | worker | admin create-key.

Settings come from ``LORAPLEX_*`` variables; flags override the few that matter per command.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from service.config import DEFAULT_TENANT_NAME, Settings


def _settings(**overrides: object) -> Settings:
    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SystemExit(f"loraplex: invalid settings:\n{exc}") from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.main import create_app

    settings = _settings(host=args.host, port=args.port)
    _setup_logging(settings.log_level)
    app = create_app(settings)
    # One process: the serving model, batcher and embedded worker live in this process, so
    # uvicorn workers > 1 would load everything N times.
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower()
    )
    server = uvicorn.Server(config)
    # Long-lived responses (job event streams) watch server.should_exit and end themselves:
    # uvicorn waits for open responses before it shuts the app (and its worker) down.
    app.state.uvicorn_server = server
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 3  # 3: uvicorn's start-up failure code


def cmd_migrate(args: argparse.Namespace) -> int:
    from service.db.migrate import current_revision, upgrade

    settings = _settings(database_url=args.url)
    _setup_logging(settings.log_level)
    upgrade(settings.db_url)
    print(f"database at revision {current_revision(settings.db_url)}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from service.worker.runner import run_worker

    settings = _settings()
    _setup_logging(settings.log_level)
    return run_worker(settings, worker_id=args.worker_id)


def cmd_create_key(args: argparse.Namespace) -> int:
    from service.db.migrate import upgrade
    from service.db.session import make_engine, make_sessionmaker
    from service.tenants.keys import create_api_key, create_tenant, tenant_by_name

    settings = _settings(database_url=args.url)
    upgrade(settings.db_url)
    engine = make_engine(settings.db_url)
    try:
        with make_sessionmaker(engine)() as session:
            tenant = tenant_by_name(session, args.tenant)
            if tenant is None:
                tenant = create_tenant(session, args.tenant)
                print(f"created tenant {args.tenant!r} ({tenant.id})", file=sys.stderr)
            new_key = create_api_key(session, tenant, is_admin=args.admin, name=args.name)
            session.commit()
            kind = "admin key" if args.admin else "key"
            print(f"{kind} {new_key.row.id} for tenant {tenant.name!r}:", file=sys.stderr)
    finally:
        engine.dispose()
    # The secret alone on stdout, so `KEY=$(loraplex admin create-key)` works.
    print(new_key.secret)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
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
    worker.set_defaults(func=cmd_worker)

    admin = sub.add_parser("admin", help="administration")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    create_key = admin_sub.add_parser("create-key", help="create an API key (prints it)")
    create_key.add_argument("--tenant", default=DEFAULT_TENANT_NAME, help="tenant name")
    create_key.add_argument("--admin", action="store_true", help="may manage tenants")
    create_key.add_argument("--name", help="a label for the key")
    create_key.add_argument("--url", help="database URL (LORAPLEX_DATABASE_URL)")
    create_key.set_defaults(func=cmd_create_key)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before torch loads: OpenMP's default spin-waiting makes threads fight over shared cores
    # (2-thread forward passes measured 2-30x slower than 1 thread here); passive waiting not.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())

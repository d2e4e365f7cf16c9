"""Fuzzing a live server with schemathesis: seeding, config and the CLI run.

Shared by ``tests/e2e/test_fuzz.py`` (small, CI) and ``bench/fuzz.py`` (long). The server is a
real ``loraplex serve`` process; the fuzzer gets a key that is both an admin key and a tenant
key (so ``/v1/tenants`` and the tenant routes are exercised), and a config whose dictionaries
hold ids of real objects — the caller's and another tenant's — so that generated requests
reach real datasets, jobs and adapters instead of only answering 404.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
ROWS = [
    {"text": "a wonderful film", "label": "pos"},
    {"text": "dull and slow", "label": "neg"},
    {"text": "loved every minute", "label": "pos"},
    {"text": "a waste of time", "label": "neg"},
]
PAIRS = [{"prompt": "q", "chosen": "good answer", "rejected": "bad"}] * 2


@dataclass
class Seeded:
    key: str  # admin + tenant key of the fuzzed tenant
    datasets: list[str]
    jobs: list[str]
    adapters: list[str]
    other_datasets: list[str]
    other_jobs: list[str]
    other_adapters: list[str]


def create_key(data_dir: Path, tenant: str, *, admin: bool) -> str:
    cmd = [sys.executable, "-m", "service", "admin", "create-key", "--tenant", tenant]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env["LORAPLEX_DATA_DIR"] = str(data_dir)
    out = subprocess.run(
        [*cmd, *(["--admin"] if admin else [])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def store_adapters(data_dir: Path, base: Any, key: str, names: list[str]) -> None:
    """Random small LoRA adapters (classification and reward) for the key's tenant."""
    import torch

    from core.adapter import Adapter
    from core.heads import Head, HeadConfig
    from core.methods import build_method, parse_method_config
    from core.model import AdaptedModel
    from service.adapters.records import next_adapter_version
    from service.adapters.store import adapter_row_from
    from service.db.models import ApiKey
    from service.db.session import make_db_engine, make_sessionmaker
    from service.tenants.keys import hash_api_key

    db_engine = make_db_engine(f"sqlite:///{data_dir / 'loraplex.db'}")
    try:
        with make_sessionmaker(db_engine)() as session:
            tenant_id = session.query(ApiKey).filter_by(key_hash=hash_api_key(key)).one().tenant_id
            for i, name in enumerate(names):
                torch.manual_seed(i)
                reward = name.startswith("reward")
                head_cfg = (
                    HeadConfig(task="reward", text_pair=True)
                    if reward
                    else HeadConfig(task="classification", label_names=["neg", "pos"])
                )
                method = build_method(parse_method_config("lora", {"r": 2}), base)
                head = Head(head_cfg, base.hidden_size).to(base.device)
                with torch.no_grad():
                    for p in [*method.parameters(), *head.parameters()]:
                        p.add_(torch.randn_like(p) * 0.1)
                adapter = Adapter.from_model(AdaptedModel(base, method, head), 0, {})
                row = adapter_row_from(adapter, base, name=name)
                row.tenant_id = tenant_id
                row.version = next_adapter_version(session, tenant_id)
                session.add(row)
            session.commit()
    finally:
        db_engine.dispose()


def _seed_tenant(client: httpx.Client) -> tuple[list[str], list[str]]:
    datasets = []
    for kind, records in (("classification", ROWS), ("preference", PAIRS)):
        resp = client.post("/v1/datasets", json={"kind": kind, "records": records})
        resp.raise_for_status()
        datasets.append(resp.json()["id"])
    resp = client.post(
        "/v1/fine_tuning/jobs",
        json={"training_file": datasets[0], "method": {"type": "lora"}},
    )
    resp.raise_for_status()
    return datasets, [resp.json()["id"]]


def seed_objects(base_url: str, data_dir: Path, base: Any) -> Seeded:
    """Objects for the fuzzed tenant (``default``) and for another tenant (``other``)."""
    key = create_key(data_dir, "default", admin=True)
    other_key = create_key(data_dir, "other", admin=False)
    names, other_names = ["sentiment", "reward-model"], ["sentiment", "secret"]
    store_adapters(data_dir, base, key, names)
    store_adapters(data_dir, base, other_key, other_names)
    out: dict[str, Any] = {}
    for who, k in (("mine", key), ("other", other_key)):
        with httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {k}"}, timeout=60
        ) as client:
            out[who] = _seed_tenant(client)
    return Seeded(
        key=key,
        datasets=out["mine"][0],
        jobs=out["mine"][1],
        adapters=names,
        other_datasets=out["other"][0],
        other_jobs=out["other"][1],
        other_adapters=other_names,
    )


def config_toml(s: Seeded) -> str:
    """Dictionaries of real ids, bound to the parameters that name objects (not always)."""

    def values(items: list[str]) -> str:
        return json.dumps(items)

    datasets = values(s.datasets + s.other_datasets)
    jobs = values(s.jobs + s.other_jobs)
    adapters = values(sorted(set(s.adapters + s.other_adapters)))
    bindings = {
        "path.dataset_id": "datasets",
        "path.file_id": "datasets",
        "path.job_id": "jobs",
        "path.name": "adapters",
        "path.model_id": "adapters",
        "query.adapter": "adapters",
        "body.training_file": "datasets",
        "body.validation_file": "datasets",
    }
    lines = [
        "[dictionaries.datasets]",
        f"values = {datasets}",
        "[dictionaries.jobs]",
        f"values = {jobs}",
        "[dictionaries.adapters]",
        f"values = {adapters}",
        "",
        "[parameters]",
    ]
    for param, dictionary in bindings.items():
        lines.append(f'"{param}" = {{ dictionary = "{dictionary}", probability = 0.6 }}')
    return "\n".join(lines) + "\n"


@dataclass
class FuzzResult:
    returncode: int
    output: str
    generated: int | None
    passed: int | None
    failed: int | None
    seconds: float | None


def run_schemathesis(
    base_url: str,
    key: str,
    config_path: Path,
    *,
    max_examples: int,
    seed: int | None,
    workers: int = 1,
    phases: str = "examples,coverage,fuzzing",
    max_time: float | None = None,
    timeout: float | None = None,
    report_dir: Path | None = None,
) -> FuzzResult:
    """``schemathesis run`` with the ``not_a_server_error`` check only (any 5xx fails)."""
    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [
        str(exe) if exe.exists() else "schemathesis",
        "--config-file",
        str(config_path),
        "run",
        f"{base_url}/openapi.json",
        "-H",
        f"Authorization: Bearer {key}",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(max_examples),
        "--phases",
        phases,
        "--workers",
        str(workers),
        "--request-timeout",
        "60",
        "--generation-database",
        "none",
        "--no-color",
        "--output-truncate",
        "false",
    ]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    if max_time is not None:
        cmd += ["--max-time", str(int(max_time))]
    if report_dir is not None:
        cmd += ["--report", "junit", "--report-dir", str(report_dir)]
    # cwd: schemathesis keeps a .schemathesis/ cache in its working directory; not the repo.
    proc = subprocess.run(
        cmd, cwd=config_path.parent, capture_output=True, text=True, timeout=timeout
    )
    out = proc.stdout + proc.stderr
    return FuzzResult(proc.returncode, out, *_summary(out))


def _summary(out: str) -> tuple[int | None, int | None, int | None, float | None]:
    m = re.search(r"(\d+) generated, (.*)", out)
    generated = int(m.group(1)) if m else None
    rest = m.group(2) if m else ""
    passed = re.search(r"(\d+) passed", rest)
    failed = re.search(r"(\d+) failed", rest)
    secs = re.search(r"in ([\d.]+)s", out.splitlines()[-1] if out.strip() else "")
    return (
        generated,
        int(passed.group(1)) if passed else None,
        int(failed.group(1)) if failed else 0,
        float(secs.group(1)) if secs else None,
    )


def server_errors_in_log(log: str) -> list[str]:
    """Lines of a server log that record an unhandled error (a 500)."""
    return [line for line in log.splitlines() if "unhandled error on" in line]

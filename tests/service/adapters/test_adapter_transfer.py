"""Adapter export (PEFT / loraplex zips) and import (with every refusal an upload deserves).

The app runs with the tiny test encoder loaded (no batcher). PEFT folders are made by the
real ``peft`` package on the same tiny BERT, as a user's ``save_pretrained`` would.
"""

from __future__ import annotations

import io
import json
import random
import stat
import warnings
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.adapter import Adapter
from core.base import FrozenBase
from core.heads import Head, HeadConfig
from core.training.metrics import ClassificationMetrics
from service.adapters.store import adapter_from_row, adapter_row_from
from service.config import Settings
from service.datasets.rows import Limits
from service.db.models import AdapterRow, Tenant
from service.main import create_app
from service.state import app_state
from tests.core.util import make_method, make_model, randomize
from tests.service.helpers import (
    Headers,
    adapter_row,
    assert_error,
    default_auth,
    serve_base,
    tenant_id_by_name,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IMPORT = "/v1/adapters/import"
LABELS = ["neg", "pos"]


@pytest.fixture
def client(settings: Settings, tiny_base: FrozenBase) -> Iterator[TestClient]:
    settings.base_model_name = tiny_base.name
    settings.bases = [tiny_base.name]
    with TestClient(create_app(settings, hooks=[serve_base(tiny_base)])) as test_client:
        yield test_client


# --- building archives -----------------------------------------------------------------------


def zip_bytes(files: dict[str, bytes], *, folder: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(folder + name, data)
    return buf.getvalue()


def unzip(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def read_folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def peft_lora_folder(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA saved by PEFT itself (safetensors, README.md, no loraplex head)."""
    hf = transformers.BertModel.from_pretrained(str(tiny_model_dir))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    model = peft.get_peft_model(hf, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    out = tmp_path_factory.mktemp("peft-lora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def peft_files(peft_lora_folder: Path) -> dict[str, bytes]:
    files = read_folder(peft_lora_folder)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    return files


def upload(
    client: TestClient, headers: Headers, data: bytes, name: str = "imported", **fields: Any
) -> httpx.Response:
    form: dict[str, Any] = {"name": name, **fields}
    return client.post(
        IMPORT, headers=headers, data=form, files={"file": ("a.zip", data, "application/zip")}
    )


def store_core_adapter(
    db: sessionmaker[Session], base: FrozenBase, name: str, method: str, **params: Any
) -> Adapter:
    """Put a trained-looking core adapter in the default tenant, as the worker would."""
    model = make_model(base, method, **params)
    randomize(model, std=0.1)
    adapter = Adapter.from_model(model, model.num_trainable(), {"val_accuracy": 0.5})
    store_adapter(db, base, adapter, name)
    return adapter


def store_adapter(db: sessionmaker[Session], base: FrozenBase, adapter: Adapter, name: str) -> None:
    with db() as session:
        row = adapter_row_from(adapter, base, name=name)
        row.tenant_id = session.scalars(select(Tenant.id).where(Tenant.name == "default")).one()
        row.version = 1
        session.add(row)
        session.commit()


def stored(db: sessionmaker[Session], name: str) -> Adapter:
    with db() as session:
        row = session.scalars(select(AdapterRow).where(AdapterRow.name == name)).one()
        return adapter_from_row(row)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# --- PEFT import and export ------------------------------------------------------------------


def test_peft_saved_lora_round_trips(
    client: TestClient, auth: Headers, db: sessionmaker[Session], peft_files: dict[str, bytes]
) -> None:
    resp = upload(client, auth, zip_bytes(peft_files), task="classification", label_names=LABELS)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "adapter" and body["name"] == "imported"
    assert body["method"] == "lora" and body["task"] == "classification"
    assert body["label_names"] == LABELS and body["version"] >= 1
    assert body["source_job_id"] is None and body["metrics"] == {"imported_from": "peft"}
    assert body["trainable_params"] > 0 and body["size_bytes"] > 0
    imported = stored(db, "imported")
    assert imported.method.r == 4 and imported.method.target_modules == ["query", "value"]

    export = client.get("/v1/adapters/imported/export", headers=auth)
    assert export.status_code == 200 and export.headers["content-type"] == "application/zip"
    assert "imported-v" in export.headers["content-disposition"]
    files = unzip(export.content)
    assert set(files) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "loraplex_head.safetensors",
    }
    # The LoRA weights leave exactly as PEFT wrote them.
    assert_same_state(
        st_load(files["adapter_model.safetensors"]),
        st_load(peft_files["adapter_model.safetensors"]),
    )
    config = json.loads(files["adapter_config.json"])
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert config["loraplex"]["head"]["label_names"] == LABELS

    # Our export carries its head: it imports again without task/labels, head weights kept.
    again = upload(client, auth, export.content, name="imported-again")
    assert again.status_code == 200, again.text
    twin = stored(db, "imported-again")
    assert_same_state(twin.method_state, imported.method_state)
    assert_same_state(twin.head_state, imported.head_state)


def test_our_peft_export_loads_in_peft(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    tiny_base: FrozenBase,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    store_core_adapter(db, tiny_base, "mine", "lora", r=2, target_modules=["query", "key"])
    export = client.get("/v1/adapters/mine/export?format=peft", headers=auth)
    assert export.status_code == 200, export.text
    for name, data in unzip(export.content).items():
        (tmp_path / name).write_bytes(data)
    hf = transformers.BertModel.from_pretrained(str(tiny_model_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about our extra "loraplex" key
        model = peft.PeftModel.from_pretrained(hf, str(tmp_path))
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A]
    assert len(wrapped) == 2 * tiny_base.num_layers


def test_nested_single_folder_and_junk_are_fine(
    client: TestClient, auth: Headers, peft_files: dict[str, bytes]
) -> None:
    files = {**peft_files, "notes.txt": b"ignored"}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("outer/inner/", b"")  # a directory entry
        for name, data in files.items():
            zf.writestr(f"outer/inner/{name}", data)
        zf.writestr("__MACOSX/outer/inner/._adapter_config.json", b"\x00\x05")
    resp = upload(client, auth, buf.getvalue(), task="classification", label_names="neg,pos")
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    "labels", [["neg", "pos"], "neg,pos", '["neg", "pos"]'], ids=["repeated", "csv", "json"]
)
def test_label_names_forms(
    client: TestClient, auth: Headers, peft_files: dict[str, bytes], labels: Any
) -> None:
    resp = upload(client, auth, zip_bytes(peft_files), task="classification", label_names=labels)
    assert resp.status_code == 200, resp.text
    assert resp.json()["label_names"] == LABELS


def test_reward_head_for_a_peft_adapter(
    client: TestClient, auth: Headers, peft_files: dict[str, bytes]
) -> None:
    resp = upload(client, auth, zip_bytes(peft_files), task="reward")
    assert resp.status_code == 200, resp.text
    assert resp.json()["task"] == "reward" and resp.json()["label_names"] is None


def test_a_peft_adapter_without_head_needs_a_task(
    client: TestClient, auth: Headers, peft_files: dict[str, bytes]
) -> None:
    resp = upload(client, auth, zip_bytes(peft_files))
    assert_error(resp, 422, param="task", code="head_required")
    # A folder that is no PEFT adapter is told what it lacks first, not to send a task.
    weightless = {k: v for k, v in peft_files.items() if k != "adapter_model.safetensors"}
    error = assert_error(upload(client, auth, zip_bytes(weightless)), 422, param="file")
    assert error["message"] == "adapter_model.safetensors is missing"
    listed = zip_bytes({**peft_files, "adapter_config.json": b"[]"})
    error = assert_error(upload(client, auth, listed), 422, param="file")
    assert "head" not in error["message"] and "adapter_config.json" in error["message"]
    resp = upload(client, auth, zip_bytes(peft_files), task="classification")
    assert_error(resp, 422, param="label_names", code="invalid_head")
    resp = upload(client, auth, zip_bytes(peft_files), label_names=LABELS)
    assert_error(resp, 422, param="task", code="missing_task")
    resp = upload(client, auth, zip_bytes(peft_files), task="regression")
    assert_error(resp, 422, param="task")


# --- loraplex format -------------------------------------------------------------------------


def test_bottleneck_adapter_exports_as_loraplex_only(
    client: TestClient, auth: Headers, db: sessionmaker[Session], tiny_base: FrozenBase
) -> None:
    original = store_core_adapter(db, tiny_base, "bottle", "adapter", bottleneck_size=8)
    resp = client.get("/v1/adapters/bottle/export?format=peft", headers=auth)
    error = assert_error(resp, 422, param="format", code="no_peft_format")
    assert "format=loraplex" in error["message"]

    export = client.get("/v1/adapters/bottle/export", headers=auth)  # default: loraplex
    assert export.status_code == 200, export.text
    assert "bottle-v1-loraplex.zip" in export.headers["content-disposition"]
    files = unzip(export.content)
    assert set(files) == {"loraplex_adapter.json", "loraplex_adapter.safetensors"}
    assert json.loads(files["loraplex_adapter.json"])["method"]["type"] == "adapter"

    resp = upload(client, auth, export.content, name="bottle-copy")
    assert resp.status_code == 200, resp.text
    assert resp.json()["method"] == "adapter"
    assert resp.json()["metrics"] == {"val_accuracy": 0.5, "imported_from": "loraplex"}
    copy = stored(db, "bottle-copy")
    assert_same_state(copy.method_state, original.method_state)
    assert_same_state(copy.head_state, original.head_state)
    # A loraplex export carries its head; a different one is refused rather than swapped in.
    resp = upload(client, auth, export.content, name="x", task="reward")
    assert_error(resp, 422, param="task", code="head_not_allowed")


def test_lora_exports_as_loraplex_too(
    client: TestClient, auth: Headers, db: sessionmaker[Session], tiny_base: FrozenBase
) -> None:
    store_core_adapter(db, tiny_base, "lo", "lora", r=2)
    export = client.get("/v1/adapters/lo/export?format=loraplex", headers=auth)
    assert set(unzip(export.content)) == {"loraplex_adapter.json", "loraplex_adapter.safetensors"}
    assert_error(client.get("/v1/adapters/lo/export?format=onnx", headers=auth), 422)


# --- another base ----------------------------------------------------------------------------


def _edit_config(files: dict[str, bytes], **changes: Any) -> dict[str, bytes]:
    cfg = json.loads(files["adapter_config.json"])
    cfg.update(changes)
    return {**files, "adapter_config.json": json.dumps(cfg).encode()}


def test_adapter_for_another_base_is_refused(
    client: TestClient, auth: Headers, peft_files: dict[str, bytes], tmp_path: Path
) -> None:
    other = _edit_config(peft_files, base_model_name_or_path="bert-base-uncased")
    resp = upload(client, auth, zip_bytes(other), task="classification", label_names=LABELS)
    error = assert_error(resp, 422, param="file", code="base_model_mismatch")
    assert "bert-base-uncased" in error["message"]

    # Same name, other architecture: a LoRA trained for hidden size 48 does not fit.
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    model = peft.get_peft_model(
        transformers.BertModel(config), peft.LoraConfig(r=2, target_modules=["query"])
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(tmp_path))
    wider = _edit_config(read_folder(tmp_path), base_model_name_or_path="loraplex-tests/tiny-bert")
    resp = upload(client, auth, zip_bytes(wider), task="classification", label_names=LABELS)
    assert_error(resp, 422, param="file", code="base_model_mismatch")


def test_loraplex_export_of_another_base_is_refused(
    client: TestClient, auth: Headers, db: sessionmaker[Session], tiny_base: FrozenBase
) -> None:
    store_core_adapter(db, tiny_base, "src", "lora", r=2)
    files = unzip(client.get("/v1/adapters/src/export?format=loraplex", headers=auth).content)
    config = json.loads(files["loraplex_adapter.json"])
    config["base_fingerprint"] = "0" * 64
    files["loraplex_adapter.json"] = json.dumps(config).encode()
    resp = upload(client, auth, zip_bytes(files), name="dst")
    assert_error(resp, 422, param="file", code="base_model_mismatch")


# --- numbers and fields that cannot serve ---------------------------------------------------


def _with_weights(files: dict[str, bytes], edit: Any) -> dict[str, bytes]:
    tensors = dict(st_load(files["adapter_model.safetensors"]))
    edit(tensors)
    return {**files, "adapter_model.safetensors": st_save(tensors)}


def test_a_scaling_past_float32_is_refused_and_a_large_one_that_serves_is_not(
    client: TestClient, auth: Headers, peft_files: dict[str, bytes]
) -> None:
    """lora_alpha=1e308 used to import, then every /predict on it was a 500."""
    for alpha in (1e308, 1e30):
        files = _edit_config(peft_files, lora_alpha=alpha)
        resp = upload(client, auth, zip_bytes(files), task="classification", label_names=LABELS)
        error = assert_error(resp, 422, param="file", code="invalid_adapter")
        assert "finite" in error["message"] or "lora_alpha" in error["message"]
    files = _edit_config(peft_files, lora_alpha=64)
    resp = upload(client, auth, zip_bytes(files), task="classification", label_names=LABELS)
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_refused_naming_the_tensor(
    client: TestClient, auth: Headers, peft_files: dict[str, bytes], bad: float
) -> None:
    key = sorted(k for k in st_load(peft_files["adapter_model.safetensors"]) if "lora_B" in k)[0]

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = bad

    files = _with_weights(peft_files, poison)
    resp = upload(client, auth, zip_bytes(files), task="classification", label_names=LABELS)
    error = assert_error(resp, 422, param="file", code="invalid_adapter")
    assert "NaN or infinite" in error["message"]


def test_a_loraplex_export_with_a_nan_is_refused_naming_the_tensor(
    client: TestClient, auth: Headers, db: sessionmaker[Session], tiny_base: FrozenBase
) -> None:
    store_core_adapter(db, tiny_base, "src", "adapter")
    files = unzip(client.get("/v1/adapters/src/export?format=loraplex", headers=auth).content)
    tensors = dict(st_load(files["loraplex_adapter.safetensors"]))
    key = sorted(k for k in tensors if k.startswith("head."))[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    files["loraplex_adapter.safetensors"] = st_save(tensors)
    resp = upload(client, auth, zip_bytes(files), name="dst")
    error = assert_error(resp, 422, param="file", code="invalid_adapter")
    assert "NaN or infinite" in error["message"] and key.removeprefix("head.") in error["message"]


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"target_modules": ["query", "nonexistent"]}, "nonexistent"),
        ({"target_modules": ["query"]}, "do not select"),  # the weights also adapt value
        ({"target_modules": "encoder\\.layer\\.9\\..*"}, "name no linear layer"),
        ({"layers_to_transform": [0, 7]}, "out of range"),
        ({"layers_to_transform": [0]}, "do not select"),  # weights for layer 1 too
        ({"layers_to_transform": "all"}, "not a list"),
    ],
)
def test_peft_fields_that_do_not_fit_are_refused_not_ignored(
    client: TestClient,
    auth: Headers,
    peft_files: dict[str, bytes],
    changes: dict[str, Any],
    says: str,
) -> None:
    files = _edit_config(peft_files, **changes)
    resp = upload(client, auth, zip_bytes(files), task="classification", label_names=LABELS)
    error = assert_error(resp, 422, param="file", code="invalid_adapter")
    assert says in error["message"]


# --- unsafe and broken archives --------------------------------------------------------------


def _zip_with(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return buf.getvalue()


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


CONFIG = b'{"peft_type": "LORA"}'


@pytest.mark.parametrize(
    ("entries", "code", "needle"),
    [
        ([("../adapter_config.json", CONFIG)], "unsafe_path", ".."),
        ([("a/../../adapter_config.json", CONFIG)], "unsafe_path", ".."),
        ([("..\\adapter_config.json", CONFIG)], "unsafe_path", ".."),
        ([("/etc/adapter_config.json", CONFIG)], "unsafe_path", "absolute"),
        ([("C:/adapter_config.json", CONFIG)], "unsafe_path", "absolute"),
        ([(_symlink("adapter_config.json"), b"/etc/passwd")], "unsafe_member", "symbolic link"),
        (
            [("adapter_config.json", CONFIG), ("adapter_model.bin", b"\x80\x02}q\x00.")],
            "pickle_refused",
            "pickle",
        ),
        ([("model/pytorch_model.pt", b"PK")], "pickle_refused", "pickle"),
        (
            [("x/adapter_config.json", CONFIG), ("y/adapter_model.safetensors", b"{}")],
            "multiple_folders",
            "one folder",
        ),
        ([(f"f{i}.json", b"{}") for i in range(40)], "too_many_members", "members"),
        (
            [("adapter_config.json", CONFIG), ("adapter_config.json", CONFIG)],
            "duplicate_member",
            "",
        ),
        ([("README.md", b"# hi")], "unknown_archive_format", "neither"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "backslash-dotdot",
        "absolute",
        "drive-letter",
        "symlink",
        "pickle-bin",
        "pickle-pt",
        "two-folders",
        "too-many",
        "duplicate",
        "no-adapter",
    ],
)
def test_unsafe_archives_are_refused(
    client: TestClient,
    auth: Headers,
    entries: list[tuple[zipfile.ZipInfo | str, bytes]],
    code: str,
    needle: str,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        data = _zip_with(entries)
    error = assert_error(upload(client, auth, data), 422, param="file", code=code)
    assert needle in error["message"]


def test_zip_bomb_is_refused_before_unpacking(client: TestClient, auth: Headers) -> None:
    bomb = _zip_with(
        [("adapter_config.json", CONFIG), ("adapter_model.safetensors", bytes(50 << 20))]
    )
    assert len(bomb) < 200_000
    error = assert_error(upload(client, auth, bomb), 422, code="suspicious_compression")
    assert "zip bomb" in error["message"]


def test_declared_size_over_the_cap_is_refused(client: TestClient, auth: Headers) -> None:
    app_state(client.app).settings.max_import_mb = 1  # cap: 2 MB
    data = _zip_with(
        [("adapter_config.json", CONFIG), ("adapter_model.safetensors", bytes(3 << 20))]
    )
    assert len(data) < 1 << 20  # the upload itself is within the limit
    assert_error(upload(client, auth, data), 422, code="archive_too_large")


def test_upload_over_the_limit_is_413(client: TestClient, auth: Headers) -> None:
    app_state(client.app).settings.max_import_mb = 1
    assert_error(upload(client, auth, bytes(1_500_000)), 413, code="request_too_large")


def _padded_zip(files: dict[str, bytes], size: int) -> bytes:
    """A zip of ``files`` and a stored padding.txt (never read) making it exactly ``size``
    bytes: a stored member's bytes add one to one to the archive."""

    def build(pad: int) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in files.items():
                zf.writestr(name, data)
            zf.writestr("padding.txt", bytes(pad), compress_type=zipfile.ZIP_STORED)
        return buf.getvalue()

    data = build(size - len(build(0)))
    assert len(data) == size
    return data


def test_an_import_may_be_max_import_mb_not_max_upload_mb(
    client: TestClient, auth: Headers, peft_files: dict[str, bytes]
) -> None:
    """A `full` adapter's loraplex export (79 MiB) was a 413: an import was held to
    max_upload_mb (50). The app's body limit is the one it started with (128 MiB and the
    form's framing): the route's own read decides here."""
    settings = app_state(client.app).settings
    settings.max_upload_mb, settings.max_import_mb = 1, 2
    resp = upload(client, auth, _padded_zip(peft_files, 2 << 20), task="reward")
    assert resp.status_code == 200, resp.text
    over = upload(client, auth, _padded_zip(peft_files, (2 << 20) + 1), "over", task="reward")
    error = assert_error(over, 413, param="file", code="request_too_large")
    assert "2 MB" in error["message"]


def test_the_import_route_s_body_limit_is_max_import_mb(
    settings: Settings, tiny_base: FrozenBase, peft_files: dict[str, bytes]
) -> None:
    """Past an upload's limit and its framing (1 + 1 MiB), within max_import_mb: accepted
    before the route reads it, while a dataset upload keeps max_upload_mb."""
    settings.base_model_name, settings.bases = tiny_base.name, [tiny_base.name]
    settings.max_upload_mb, settings.max_import_mb = 1, 3
    with TestClient(create_app(settings, hooks=[serve_base(tiny_base)])) as app:
        auth = default_auth(settings)
        data = _padded_zip(peft_files, 5 << 19)  # 2.5 MiB
        resp = upload(app, auth, data, task="reward")
        assert resp.status_code == 200, resp.text
        dataset = app.post(
            "/v1/datasets",
            headers=auth,
            data={"kind": "classification"},
            files={"file": ("d.jsonl", data, "application/jsonl")},
        )
        assert_error(dataset, 413, code="request_too_large")


@pytest.mark.parametrize("data", [b"not a zip", b"PK\x03\x04broken"], ids=["text", "truncated"])
def test_not_a_zip(client: TestClient, auth: Headers, data: bytes) -> None:
    assert_error(upload(client, auth, data), 422, param="file", code="invalid_archive")


def test_corrupt_safetensors_is_422(client: TestClient, auth: Headers) -> None:
    files = {"adapter_config.json": CONFIG, "adapter_model.safetensors": b"\x80\x02pickle"}
    resp = upload(client, auth, zip_bytes(files), task="reward")
    assert_error(resp, 422, param="file", code="invalid_adapter")


# --- names, quotas, tenants, readiness -------------------------------------------------------


def test_name_collisions_are_409(
    client: TestClient, auth: Headers, db: sessionmaker[Session], peft_files: dict[str, bytes]
) -> None:
    fields = {"task": "classification", "label_names": LABELS}
    assert upload(client, auth, zip_bytes(peft_files), name="dup", **fields).status_code == 200
    resp = upload(client, auth, zip_bytes(peft_files), name="dup", **fields)
    assert_error(resp, 409, param="name", code="adapter_name_taken")
    # A name an unfinished job will create is taken too.
    train = client.post(
        "/v1/datasets",
        headers=auth,
        json={
            "kind": "classification",
            "records": [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}],
        },
    ).json()["id"]
    job = client.post(
        "/v1/fine_tuning/jobs",
        headers=auth,
        json={"training_file": train, "adapter_name": "reserved", "method": {"type": "lora"}},
    )
    assert job.status_code == 200, job.text
    resp = upload(client, auth, zip_bytes(peft_files), name="reserved", **fields)
    assert_error(resp, 409, code="adapter_name_taken")


def test_bad_names_are_422(client: TestClient, auth: Headers, peft_files: dict[str, bytes]) -> None:
    for name in ("", "has space", "../x", "x" * 65):
        resp = upload(client, auth, zip_bytes(peft_files), name=name, task="reward")
        assert_error(resp, 422, param="name")


def test_adapter_quota_is_429(
    client: TestClient, auth: Headers, db: sessionmaker[Session], peft_files: dict[str, bytes]
) -> None:
    app_state(client.app).settings.max_adapters_per_tenant = 1
    with db() as session:
        session.add(adapter_row(tenant_id_by_name(db), "one"))
        session.commit()
    resp = upload(client, auth, zip_bytes(peft_files), task="reward")
    assert_error(resp, 429, code="adapter_limit", type="rate_limit_error")


def test_parallel_imports_take_no_more_than_the_adapter_quota(
    client: TestClient, auth: Headers, peft_files: dict[str, bytes]
) -> None:
    # Each import checks the quota before and after building its adapter; without the
    # tenant's row held from the second check to the commit, 10 parallel imports stored 4
    # where 3 fit.
    app_state(client.app).settings.max_adapters_per_tenant = 3
    archive = zip_bytes(peft_files)
    with ThreadPoolExecutor(8) as pool:
        codes = sorted(
            pool.map(
                lambda i: upload(client, auth, archive, name=f"p{i}", task="reward").status_code,
                range(8),
            )
        )
    assert codes == [200] * 3 + [429] * 5
    assert len(client.get("/v1/adapters", headers=auth).json()["data"]) == 3


def test_adapter_byte_quota_is_429_at_import(
    client: TestClient, auth: Headers, db: sessionmaker[Session], peft_files: dict[str, bytes]
) -> None:
    # Room left for the archive's upload, not for its weights: the check counts the weights.
    app_state(client.app).settings.max_adapter_bytes_per_tenant = 100
    with db() as session:
        session.add(adapter_row(tenant_id_by_name(db), "one", size_bytes=64))
        session.commit()
    resp = upload(client, auth, zip_bytes(peft_files), task="reward")
    error = assert_error(resp, 429, code="adapter_bytes_limit", type="rate_limit_error")
    assert "adapters use 64 B of 100 B; this one adds" in error["message"]
    with db() as session:
        assert session.scalars(select(AdapterRow.name)).all() == ["one"]


def test_import_and_export_are_tenant_scoped(
    client: TestClient,
    auth: Headers,
    other_auth: Headers,
    db: sessionmaker[Session],
    tiny_base: FrozenBase,
    peft_files: dict[str, bytes],
) -> None:
    store_core_adapter(db, tiny_base, "private", "lora", r=2)
    assert_error(client.get("/v1/adapters/private/export", headers=other_auth), 404)
    # The same name is free in another tenant.
    resp = upload(client, other_auth, zip_bytes(peft_files), name="private", task="reward")
    assert resp.status_code == 200, resp.text
    assert_error(client.get("/v1/adapters/nope/export", headers=auth), 404)


def test_without_a_loaded_base_import_is_503(
    settings: Settings, auth: Headers, peft_files: dict[str, bytes]
) -> None:
    with TestClient(create_app(settings, hooks=[])) as bare:
        resp = upload(bare, auth, zip_bytes(peft_files), task="reward")
        assert_error(resp, 503, code="model_not_ready")
        assert resp.headers["retry-after"] == "5"


def test_import_needs_multipart(client: TestClient, auth: Headers) -> None:
    assert_error(client.post(IMPORT, headers=auth, json={"name": "x"}), 415)
    resp = client.post(IMPORT, headers=auth, data={"name": "x"}, files={"other": ("a", b"")})
    assert_error(resp, 422, param="file", code="missing_file")


def test_imported_adapter_keeps_its_bytes_like_a_trained_one(
    client: TestClient, auth: Headers, db: sessionmaker[Session], peft_files: dict[str, bytes]
) -> None:
    resp = upload(client, auth, zip_bytes(peft_files), task="classification", label_names=LABELS)
    assert resp.status_code == 200
    with db() as session:
        row = session.scalars(select(AdapterRow).where(AdapterRow.name == "imported")).one()
        assert row.size_bytes == len(row.weights)
        assert row.config["format"] == "loraplex.adapter/1"
        assert row.base_model == "loraplex-tests/tiny-bert"
        assert set(st_load(row.weights))  # safetensors, never pickle


# --- bounded, well-typed metadata ------------------------------------------------------------


def _loraplex_export(client: TestClient, auth: Headers, name: str) -> dict[str, bytes]:
    resp = client.get(f"/v1/adapters/{name}/export?format=loraplex", headers=auth)
    assert resp.status_code == 200, resp.text
    return unzip(resp.content)


def _with_loraplex_config(files: dict[str, bytes], **changes: Any) -> bytes:
    config = json.loads(files["loraplex_adapter.json"])
    config.update(changes)
    return zip_bytes({**files, "loraplex_adapter.json": json.dumps(config).encode()})


def _adapter_names(db: sessionmaker[Session]) -> list[str]:
    with db() as session:
        return list(session.scalars(select(AdapterRow.name)))


@pytest.mark.parametrize(
    "changes",
    [
        {"trainable_params": "abc"},
        {"trainable_params": [1]},
        {"trainable_params": float("inf")},
        {"trainable_params": -1},
        {"trainable_params": 2**64},
        {"metrics": [1]},
        {"metrics": "ab"},
        {"metrics": {"x": float("nan")}},
        {"metrics": {"x": float("-inf")}},
        {"metrics": {"x": 10**400}},
        {"metrics": {"x": [1, 2]}},
        {"metrics": {"x": random.Random(0).randbytes(2_500_000).hex()}},  # 5 MB, incompressible
        {"metrics": {"k" * 257: 1}},
        {"metrics": {"a": {"b": {"c": {"d": 1}}}}},
        {"metrics": {f"m{i}": i for i in range(8_001)}},
        {"base_name": ["x"]},
    ],
    ids=[
        "params-text",
        "params-list",
        "params-infinity",
        "params-negative",
        "params-past-64-bits",
        "metrics-list",
        "metrics-text",
        "metric-nan",
        "metric-infinity",
        "metric-huge-int",
        "metric-list",
        "metric-5mb-text",
        "metric-long-name",
        "metrics-too-deep",
        "metrics-too-many",
        "base-name-list",
    ],
)
def test_a_loraplex_config_with_bad_metadata_is_422_and_stores_nothing(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    tiny_base: FrozenBase,
    changes: dict[str, Any],
) -> None:
    """These were 500s (int("abc"), dict("ab"), NaN on PostgreSQL) or stored megabytes."""
    store_core_adapter(db, tiny_base, "src", "lora", r=2)
    data = _with_loraplex_config(_loraplex_export(client, auth, "src"), **changes)
    resp = upload(client, auth, data, name="dst")
    assert_error(resp, 422, param="file", code="invalid_adapter")
    assert _adapter_names(db) == ["src"]


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"metrics": {"\ud800": 1}}, "invalid_unicode"),
        ({"head": {"task": "classification", "label_names": ["neg", "\ud800"]}}, "invalid_unicode"),
        # The method config's own check (a bounded string) refuses it first.
        (
            {"method": {"type": "prompt_tuning", "init": "text", "init_text": "\ud800"}},
            "invalid_adapter",
        ),
        ({"base_name": "\ud800"}, "invalid_unicode"),
    ],
    ids=["metric-name", "label-name", "init-text", "base-name"],
)
def test_a_lone_surrogate_in_a_loraplex_config_is_422(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    tiny_base: FrozenBase,
    changes: dict[str, Any],
    code: str,
) -> None:
    """JSON's "\\ud800" escape parses to text no UTF-8 store holds: a 500 on storing it."""
    method = "prompt_tuning" if "method" in changes else "lora"
    store_core_adapter(db, tiny_base, "src", method)
    data = _with_loraplex_config(_loraplex_export(client, auth, "src"), **changes)
    resp = upload(client, auth, data, name="dst")
    assert_error(resp, 422, param="file", code=code)
    assert _adapter_names(db) == ["src"]


def test_a_lone_surrogate_in_a_peft_config_is_422(
    client: TestClient, auth: Headers, db: sessionmaker[Session], tiny_base: FrozenBase
) -> None:
    """Our export's prompt-tuning init_text is tokenized on import: the tokenizer's
    TypeError on a lone surrogate was a 500."""
    store_core_adapter(db, tiny_base, "src", "prompt_tuning", n_virtual_tokens=4)
    files = unzip(client.get("/v1/adapters/src/export?format=peft", headers=auth).content)
    config = json.loads(files["adapter_config.json"])
    config["loraplex"]["method"].update(init="text", init_text="\ud800")
    files["adapter_config.json"] = json.dumps(config).encode()
    resp = upload(client, auth, zip_bytes(files), name="dst")
    error = assert_error(resp, 422, param="file", code="invalid_adapter")
    assert "not valid Unicode" in error["message"]


def test_a_loraplex_import_records_the_base_it_was_checked_against(
    client: TestClient, auth: Headers, db: sessionmaker[Session], tiny_base: FrozenBase
) -> None:
    """The archive's base_name went into the row as it was, past the column's 256
    characters (refused by PostgreSQL alone)."""
    store_core_adapter(db, tiny_base, "src", "lora", r=2)
    data = _with_loraplex_config(_loraplex_export(client, auth, "src"), base_name="x" * 300)
    resp = upload(client, auth, data, name="dst")
    assert resp.status_code == 200, resp.text
    assert resp.json()["base_model"] == tiny_base.name
    assert resp.json()["config"]["base_name"] == tiny_base.name


def test_the_metrics_of_the_largest_classifier_import(
    client: TestClient, auth: Headers, db: sessionmaker[Session], tiny_base: FrozenBase
) -> None:
    """The metric bounds hold what the trainer writes for the most labels a dataset may have,
    each of the longest name: its scalars and a per-class table (imported again, too)."""
    limits = Limits()
    labels = [f"{i:04d}".ljust(limits.max_label_chars, "é") for i in range(limits.max_labels)]
    val = ClassificationMetrics(labels).compute()
    metrics: dict[str, Any] = {f"val_{k}": v for k, v in val.items()}
    metrics.update(
        {
            "train_loss": None,
            "best_step": 10,
            "steps": 10,
            "epochs": 1.0,
            "trained_tokens": 1000,
            "stopped_early": False,
            "train_examples": 1000,
            "val_examples": 1000,
            "imported_from": "peft",
        }
    )
    head = HeadConfig(task="classification", label_names=labels)
    method = make_method(tiny_base, "lora", r=2)
    head_state = Head(head, tiny_base.hidden_size).state_dict()
    store_adapter(db, tiny_base, Adapter.from_method(method, head, 7, metrics, head_state), "wide")
    resp = upload(client, auth, zip_bytes(_loraplex_export(client, auth, "wide")), name="copy")
    assert resp.status_code == 200, resp.text
    assert resp.json()["metrics"] == {**metrics, "imported_from": "loraplex"}
    assert len(resp.json()["label_names"]) == limits.max_labels


@pytest.mark.parametrize(
    ("which", "bad"),
    [("lora_A", torch.tensor(1.0)), ("lora_B", torch.tensor(1.0)), ("lora_A", torch.ones(4))],
    ids=["A-0d", "B-0d", "A-1d"],
)
def test_a_peft_lora_whose_matrix_is_not_a_matrix_is_422(
    client: TestClient, auth: Headers, peft_files: dict[str, bytes], which: str, bad: torch.Tensor
) -> None:
    """A 0-dimensional lora_A was an IndexError (a 500) reading its rank."""
    key = sorted(k for k in st_load(peft_files["adapter_model.safetensors"]) if which in k)[0]
    files = _with_weights(peft_files, lambda tensors: tensors.update({key: bad}))
    resp = upload(client, auth, zip_bytes(files), task="classification", label_names=LABELS)
    error = assert_error(resp, 422, param="file", code="invalid_adapter")
    assert key in error["message"] and "matrix" in error["message"]


@pytest.mark.parametrize(
    "changes",
    [{"r": [4]}, {"target_modules": "query{4294967296}"}, {"target_modules": "(" * 5000}],
    ids=["r-list", "regex-repeat-overflow", "regex-nested-groups"],
)
def test_peft_config_values_of_the_wrong_kind_are_422(
    client: TestClient, auth: Headers, peft_files: dict[str, bytes], changes: dict[str, Any]
) -> None:
    files = _edit_config(peft_files, **changes)
    resp = upload(client, auth, zip_bytes(files), task="classification", label_names=LABELS)
    assert_error(resp, 422, param="file", code="invalid_adapter")


@pytest.mark.parametrize(
    "path", ["~no-such-user-here/model", "/" + "a" * 5000], ids=["unknown-user", "too-long"]
)
def test_a_base_path_the_system_cannot_look_up_proves_nothing(
    client: TestClient, auth: Headers, peft_files: dict[str, bytes], path: str
) -> None:
    """Path() raised on these (an unknown user, a name too long): a 500."""
    files = _edit_config(peft_files, base_model_name_or_path=path)
    resp = upload(client, auth, zip_bytes(files), task="classification", label_names=LABELS)
    assert resp.status_code == 200, resp.text


def test_label_names_of_a_headless_import_are_held_to_the_dataset_limits(
    client: TestClient, auth: Headers, db: sessionmaker[Session], peft_files: dict[str, bytes]
) -> None:
    """100,000 label names were stored (a 154 MB row; every /predict 100,000 scores)."""
    limits = Limits()
    data = zip_bytes(peft_files)
    many = json.dumps([f"l{i}" for i in range(100_000)])
    resp = upload(client, auth, data, task="classification", label_names=many)
    error = assert_error(resp, 422, param="label_names", code="too_many_labels")
    assert str(limits.max_labels) in error["message"]
    long = ["a", "b" * (limits.max_label_chars + 1)]
    resp = upload(client, auth, data, task="classification", label_names=long)
    assert_error(resp, 422, param="label_names", code="field_too_long")
    resp = upload(client, auth, data, task="classification", label_names='["a", "\\ud800"]')
    assert_error(resp, 422, param="label_names", code="invalid_unicode")
    # Empty or spaced names, which a dataset's labels never are (they were served as such).
    resp = upload(client, auth, data, task="classification", label_names='["", " "]')
    assert_error(resp, 422, param="label_names", code="empty_field")
    resp = upload(client, auth, data, task="classification", label_names='["a", "a "]')
    assert_error(resp, 422, param="label_names", code="invalid_value")
    assert _adapter_names(db) == []

    # At the limits, it imports.
    most = [f"{i:04d}".ljust(limits.max_label_chars, "x") for i in range(limits.max_labels)]
    resp = upload(client, auth, data, task="classification", label_names=json.dumps(most))
    assert resp.status_code == 200, resp.text
    assert resp.json()["label_names"] == most


@pytest.mark.parametrize("fmt", ["loraplex", "peft"])
def test_an_archive_head_past_the_label_limit_is_422(
    client: TestClient, auth: Headers, db: sessionmaker[Session], tiny_base: FrozenBase, fmt: str
) -> None:
    """An export carries its head's labels; an archive's are held to the same limit."""
    head = HeadConfig(task="classification", label_names=[str(i) for i in range(1_001)])
    method = make_method(tiny_base, "lora", r=2)
    head_state = Head(head, tiny_base.hidden_size).state_dict()
    store_adapter(db, tiny_base, Adapter.from_method(method, head, 1, {}, head_state), "src")
    export = client.get(f"/v1/adapters/src/export?format={fmt}", headers=auth)
    assert export.status_code == 200, export.text
    resp = upload(client, auth, export.content, name="dst")
    assert_error(resp, 422, param="file", code="too_many_labels")
    assert _adapter_names(db) == ["src"]


def _with_head_length(files: dict[str, bytes], fmt: str, length: int) -> dict[str, bytes]:
    """``files`` of an export with its head's ``max_seq_length`` set to ``length``."""
    name = "loraplex_adapter.json" if fmt == "loraplex" else "adapter_config.json"
    config = json.loads(files[name])
    head = config["head"] if fmt == "loraplex" else config["loraplex"]["head"]
    head["max_seq_length"] = length
    return {**files, name: json.dumps(config).encode()}


@pytest.mark.parametrize("fmt", ["loraplex", "peft"])
@pytest.mark.parametrize(
    ("method", "params"),
    [("lora", {"r": 2}), ("prompt_tuning", {"n_virtual_tokens": 4})],
    ids=["lora", "prompt-tuning"],
)
def test_a_head_longer_than_the_base_window_is_422(
    client: TestClient,
    auth: Headers,
    db: sessionmaker[Session],
    tiny_base: FrozenBase,
    fmt: str,
    method: str,
    params: dict[str, Any],
) -> None:
    """An archive's head.max_seq_length past the base's window (less the positions the method
    reserves) used to import; then every long /predict on it was a 500 (IndexError in the
    position embeddings)."""
    store_core_adapter(db, tiny_base, "src", method, **params)
    export = client.get(f"/v1/adapters/src/export?format={fmt}", headers=auth)
    assert export.status_code == 200, export.text
    files = unzip(export.content)
    window = tiny_base.max_length - params.get("n_virtual_tokens", 0)

    resp = upload(client, auth, zip_bytes(_with_head_length(files, fmt, window + 1)), name="long")
    error = assert_error(resp, 422, param="file", code="invalid_adapter")
    says = f"head.max_seq_length: {window + 1} is more than the base's {window}-token window"
    assert says in error["message"]
    resp = upload(client, auth, zip_bytes(_with_head_length(files, fmt, 0)), name="none")
    error = assert_error(resp, 422, param="file", code="invalid_adapter")
    assert "max_seq_length" in error["message"]
    listed = client.get("/v1/adapters", headers=auth).json()["data"]
    assert [a["name"] for a in listed] == ["src"]

    # At the window, it imports.
    resp = upload(client, auth, zip_bytes(_with_head_length(files, fmt, window)), name="fits")
    assert resp.status_code == 200, resp.text
    assert stored(db, "fits").head.max_seq_length == window

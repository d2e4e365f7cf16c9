"""Which checkpoint a ``<adapter>:ckpt-step-<N>`` model name names (service.jobs.checkpoints),
on both databases, with states written straight into the checkpoints table."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from core.training.checkpoint import FORMAT, pack
from service.db.models import Checkpoint
from service.jobs import checkpoints, queue
from service.jobs.checkpoints import find_served_checkpoint, parse_checkpoint_model
from tests.service.helpers import add_queued_job, add_tenant

Factory = sessionmaker[Session]


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("ck:ckpt-step-0", ("ck", 0)),
        ("sentiment-lora.v2_x:ckpt-step-2147483647", ("sentiment-lora.v2_x", 2**31 - 1)),
        (f"{'a' * 64}:ckpt-step-5", ("a" * 64, 5)),
        ("ck:ckpt-step-2147483648", None),  # past the step column
        (f"{'a' * 65}:ckpt-step-5", None),  # past an adapter name's length
        ("ck:ckpt-step-", None),
        ("ck:ckpt-step-1e3", None),
        ("ck:ckpt-step-007", None),
        ("ck:ckpt-step-+7", None),
        ("ck:ckpt-step-٣", None),  # a digit, not an ASCII one
        ("ck:ckpt-step-7\n", None),
        (f"ck:ckpt-step-{'9' * 10_000}", None),
        ("-ck:ckpt-step-7", None),
        ("c/k:ckpt-step-7", None),
        ("ck:ckpt-step-7:ckpt-step-7", None),
        ("ck", None),
    ],
)
def test_a_checkpoint_model_name_is_parsed_strictly(name: str, parsed: Any) -> None:
    assert parse_checkpoint_model(name) == parsed
    if parsed is not None:
        assert checkpoints.checkpoint_model(*parsed) == name


def _state(step: int, padding: int = 0) -> bytes:
    """A checkpoint whose JSON describes an adapter (no tensors: only the JSON is read)."""
    meta = {
        "format": FORMAT,
        "identity": {"method": {"type": "lora", "r": 4}, "base_fingerprint": "fp"},
        "adapter": {
            "head": {"task": "classification", "label_names": ["neg", "pos"]},
            "base_name": "tiny",
            "trainable_params": 10,
        },
        "position": {"step": step},
        "state": {"last_val": None},
        "padding": "x" * padding,
    }
    return pack(meta, {})


def _job_with_checkpoints(db: Factory, tenant_id: str, states: dict[int, bytes]) -> list[str]:
    """A job training adapter ``ck`` that saved ``states`` (step → state), in order."""
    add_queued_job(db, tenant_id, name="ck")
    ids = []
    with db() as session:
        job = queue.claim_next_job(session, "w1", 30)
        assert job is not None
        for step, state in states.items():
            saved = checkpoints.save_checkpoint(
                session, job, worker_id="w1", step=step, state=state, keep_states=10
            )
            ids.append(saved.id)
        job.status = "succeeded"  # frees the adapter name for a later job
        session.commit()
    return ids


def _find(db: Factory, tenant_id: str, step: int) -> tuple[str, dict[str, Any]] | None:
    with db() as session:
        return find_served_checkpoint(session.connection(), tenant_id, "ck", step)


def test_a_name_finds_the_newest_job_s_checkpoint_with_its_state(migrated_db: Factory) -> None:
    tenant, other = add_tenant(migrated_db, "t"), add_tenant(migrated_db, "o")
    # A JSON part past the first read's 64 KiB is read again, whole.
    first = _job_with_checkpoints(
        migrated_db, tenant, {2: _state(2), 4: _state(4, padding=100_000), 6: b"junk"}
    )
    found = _find(migrated_db, tenant, 2)
    assert found is not None and found[0] == first[0]
    assert found[1]["head"]["label_names"] == ["neg", "pos"]
    assert found[1]["method"]["type"] == "lora" and found[1]["base_fingerprint"] == "fp"
    assert found[1]["metrics"] == {"steps": 2}
    long = _find(migrated_db, tenant, 4)
    assert long is not None and long[0] == first[1]
    assert _find(migrated_db, tenant, 6) is None  # not a checkpoint's bytes
    assert _find(migrated_db, tenant, 3) is None
    assert _find(migrated_db, other, 2) is None  # another tenant's
    with migrated_db() as session:  # its state dropped: gone as a model
        session.execute(update(Checkpoint).where(Checkpoint.id == first[0]).values(state=None))
        session.commit()
    assert _find(migrated_db, tenant, 2) is None
    # The name retrained: the later job's checkpoints only.
    second = _job_with_checkpoints(migrated_db, tenant, {4: _state(4)})
    later = _find(migrated_db, tenant, 4)
    assert later is not None and later[0] == second[0]
    assert _find(migrated_db, tenant, 2) is None

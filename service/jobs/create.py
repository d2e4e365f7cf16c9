"""Creating a fine-tuning job: every check that can fail fast happens here, synchronously.

The job row is written as ``validating_files``, its files are checked inside the same
transaction, and it is committed as ``queued``; if any check fails the transaction is rolled
back, so a rejected request leaves no job behind.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.methods import parse_method_config
from core.training.config import (
    DPO_ONLY_SETTINGS,
    HEAD_ONLY_SETTINGS,
    HEAD_TASKS,
    REWARD_ONLY_SETTINGS,
    TrainingConfig,
    held_out_rows,
    hold_out_required,
    nothing_held_out,
    parse_training_config,
)
from service import ids
from service.adapters.quota import check_adapter_bytes_quota, check_adapter_quota, name_taken
from service.adapters.records import find_adapter_row
from service.bases import BaseKind, BaseSpec, resolve_job_base
from service.config import Settings
from service.datasets.rows import TASKS, DatasetKind
from service.db.models import Dataset, Job, JobStatus, Tenant
from service.db.session import committed_or_conflict
from service.errors import ErrorKind, ServiceError, conflict, invalid, not_found, quota_exceeded
from service.jobs.events import add_event
from service.jobs.openai_compat import HYPERPARAMETERS_PATH, OPENAI_METHOD_KINDS, SentPath
from service.jobs.queue import job_count
from service.jobs.validate import MethodConfigError, base_limits, validate_method
from service.tenants.lock import lock_tenant


@dataclass(frozen=True)
class JobRequest:
    """A job to create, as the API validated it (from loraplex's or OpenAI's request shape)."""

    training_file: str
    # ``{"type": ..., "<type>": {params}}`` and the hyperparameters the request set, as the
    # job row keeps them.
    method: dict[str, Any]
    hyperparameters: dict[str, Any]
    validation_file: str | None = None
    adapter_name: str | None = None
    suffix: str | None = None
    seed: int | None = None
    model: str | None = None
    # OpenAI's method type (supervised, dpo) when the request used one: it fixes the kind of
    # training data the job accepts, and the job object echoes it.
    openai_method: str | None = None
    # DPO only: the name of the tenant's chat (SFT) adapter on the same base that is DPO's
    # reference policy and the policy's starting weights, instead of the bare base.
    reference_adapter: str | None = None
    # Where the client sent each hyperparameter it did not send in method.hyperparameters (an
    # OpenAI method block, the deprecated top-level block): errors name that path.
    sent_paths: Mapping[str, SentPath] = dataclasses.field(default_factory=dict)


_SHOWN_LABELS = 5
# The OpenAI method type that trains on each dataset kind.
_OPENAI_TYPE_FOR_KIND = {
    kind: openai for openai, kinds in OPENAI_METHOD_KINDS.items() for kind in kinds
}
# The tasks each kind of base trains here, the first kind listing a task being its default.
# A decoder trains classifiers and reward models too (core's last-token heads: the worker's
# DecoderHeadTrainer); a task without a model goes to the first kind listing it (the encoder).
BASE_TASKS: dict[BaseKind, frozenset[str]] = {
    "encoder": frozenset({"classification", "reward"}),
    "decoder": frozenset({"chat", "dpo", "classification", "reward"}),
}
# The dataset kind that trains each task, for messages.
_KIND_OF_TASK = {task: kind.value for kind, task in TASKS.items()}


def _hold_out_note(config: TrainingConfig, has_validation_file: bool) -> str:
    """Say up front that training rows will be held out, so it never comes as a surprise.

    The rows themselves are counted by the worker (its first training event and
    ``resolved_hyperparameters.held_out_examples``): the split is the trainer's.
    """
    fraction = config.validation_fraction
    if has_validation_file or not fraction:
        return ""
    return (
        f"; no validation_file, so {fraction:.0%} of the training rows will be held out for "
        "validation (validation_fraction; set it to 0 to train on every row)"
    )


def _load_dataset(session: Session, tenant_id: str, dataset_id: str, param: str) -> Dataset:
    dataset = session.scalar(
        select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id)
    )
    if dataset is None:
        raise not_found("dataset", dataset_id, param)
    return dataset


def _check_files(
    training: Dataset, validation: Dataset | None, openai_method: str | None = None
) -> None:
    wanted = OPENAI_METHOD_KINDS.get(openai_method or "")
    if wanted is not None and training.kind not in wanted:
        # loraplex's own methods train on any kind; OpenAI's names say which ones they mean.
        raise invalid(
            f"method.type '{openai_method}' trains on a {' or '.join(wanted)} dataset, but "
            f"training_file is a {training.kind} dataset (use "
            f"'{_OPENAI_TYPE_FOR_KIND[training.kind]}' or 'lora').",
            "training_file",
            "dataset_kind_mismatch",
        )
    if validation is None:
        return
    if validation.kind != training.kind:
        raise invalid(
            f"validation_file is a {validation.kind} dataset but training_file is "
            f"{training.kind}; they must be of the same kind.",
            "validation_file",
            "dataset_kind_mismatch",
        )
    unknown = sorted(set(validation.label_counts or {}) - set(training.label_counts or {}))
    if unknown:
        shown = ", ".join(f"'{label}'" for label in unknown[:_SHOWN_LABELS])
        more = f" and {len(unknown) - _SHOWN_LABELS} more" if len(unknown) > _SHOWN_LABELS else ""
        raise invalid(
            f"validation_file has labels the training_file does not: {shown}{more}.",
            "validation_file",
            "unknown_validation_labels",
        )


def _adapter_name(session: Session, tenant_id: str, body: JobRequest) -> str:
    if body.adapter_name is not None:
        reason = name_taken(session, tenant_id, body.adapter_name)
        if reason:
            raise conflict(reason, "adapter_name", "adapter_name_taken")
        return body.adapter_name
    stem = body.method["type"] + (f"-{body.suffix}" if body.suffix else "")
    for _ in range(8):
        name = f"{stem}-{ids.short_hex()}"
        if name_taken(session, tenant_id, name) is None:
            return name
    raise ServiceError(
        "Could not generate a free adapter name.",
        code="name_generation_failed",
        kind=ErrorKind.INTERNAL,
    )


def _check_steps(
    config: TrainingConfig, training: Dataset, has_validation_file: bool, settings: Settings
) -> None:
    """Refuse a job planned for more optimizer steps than ``max_job_steps``, or whose
    ``validation_fraction``, sent, holds out no row (the trainer's split would fail it).

    The plan is the trainer's own arithmetic (``TrainingConfig.total_steps``) on the rows it
    will train on: without a validation file, the stratified hold-out is taken out per label
    the way ``split_validation`` takes it.
    """
    rows = training.row_count
    if not has_validation_file and config.validation_fraction > 0:
        groups = (
            list((training.label_counts or {}).values())
            if training.kind == "classification"
            else [rows]
        )
        held = sum(held_out_rows(n, config.validation_fraction) for n in groups)
        if not held and hold_out_required(config):  # the trainer's split would fail the job
            param = "method.hyperparameters.validation_fraction"
            message = nothing_held_out(rows, config.validation_fraction)
            raise invalid(f"{param}: {message}", param, "too_few_rows")
        rows -= held
    steps = config.total_steps(rows)
    if steps <= settings.max_job_steps:
        return
    if config.max_steps is not None:
        field, plan = "max_steps", f"max_steps is {steps:,}"
    else:
        field = "n_epochs"
        plan = (
            f"{config.n_epochs:,} epochs x {steps // config.n_epochs:,} batches of "
            f"batch_size {config.batch_size} over {rows:,} training rows"
        )
    raise invalid(
        f"This job would train for {steps:,} optimizer steps ({plan}); the limit is "
        f"{settings.max_job_steps:,} steps per job. Lower n_epochs or max_steps, or raise "
        "batch_size.",
        f"method.hyperparameters.{field}",
        "job_steps_limit_exceeded",
    )


def _check_quotas(session: Session, tenant_id: str, settings: Settings) -> None:
    """Under the tenant's lock (the caller's), so parallel creates count each other."""
    active = job_count(session, tenant_id)
    if active >= settings.max_concurrent_jobs_per_tenant:
        raise quota_exceeded(
            f"This tenant already has {active} queued or running jobs (limit "
            f"{settings.max_concurrent_jobs_per_tenant}); wait for one to finish.",
            "concurrent_jobs_limit",
        )
    queued = job_count(session, tenant_id, (JobStatus.QUEUED,))
    if queued >= settings.max_queued_jobs_per_tenant:
        raise quota_exceeded(
            f"This tenant already has {queued} jobs waiting in the queue (limit "
            f"{settings.max_queued_jobs_per_tenant}); wait for one to start.",
            "queued_jobs_limit",
        )
    check_adapter_quota(session, tenant_id, settings.max_adapters_per_tenant, active)
    check_adapter_bytes_quota(session, tenant_id, settings.max_adapter_bytes_per_tenant, incoming=0)


def _training_task(session: Session, tenant_id: str, dataset_id: str) -> str | None:
    """The task the training file trains (None: no such file, which is refused later, as it
    always was, after the request's own fields are checked)."""
    kind = session.scalar(
        select(Dataset.kind).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id)
    )
    return TASKS[DatasetKind(kind)] if kind is not None else None


def _job_base(settings: Settings, model: str | None, task: str | None) -> BaseSpec:
    """The base the job trains: ``model`` (404 if unknown), else the first configured base of
    the kind that trains ``task`` (a chat or dpo file: the decoder); one that does not train
    the task is refused, naming ``model``."""
    default_kind = next((k for k, tasks in BASE_TASKS.items() if task in tasks), "encoder")
    base = resolve_job_base(settings, model, default_kind=default_kind)
    if task is None or task in BASE_TASKS[base.kind]:
        return base
    kind = _KIND_OF_TASK[task]
    if model is None:
        raise invalid(
            f"A {kind} dataset trains on a {default_kind} base, and this deployment has none "
            f"configured (LORAPLEX_BASES lists {', '.join(settings.bases)}).",
            "model",
            "no_base_for_task",
        )
    trains = " and ".join(sorted(_KIND_OF_TASK[t] for t in BASE_TASKS[base.kind]))
    raise invalid(
        f"model '{model}' is a {base.kind} base, which trains on {trains} datasets here; "
        f"training_file is a {kind} dataset (use the {default_kind} base, or leave model out).",
        "model",
        "model_task_mismatch",
    )


def _check_task_settings(task: str | None, hyper: dict[str, Any]) -> None:
    """Refuse a setting that only another task reads, so no client believes it took effect."""
    only: list[tuple[frozenset[str], str, bool]] = [
        (DPO_ONLY_SETTINGS, "DPO on a decoder base (a dpo dataset)", task == "dpo"),
        (REWARD_ONLY_SETTINGS, "reward models (a preference dataset)", task == "reward"),
        (
            HEAD_ONLY_SETTINGS,
            "a classifier or a reward model (a task with a head)",
            task in HEAD_TASKS,
        ),
    ]
    for names, reader, applies in only:
        for name in sorted(names & set(hyper)):
            if applies or task is None:
                continue
            param = f"method.hyperparameters.{name}"
            raise invalid(
                f"{param}: only {reader} reads {name}; this job trains {task}.",
                param,
                "setting_not_read",
            )


# Settings that act on validation alone: sent (and not null) they ask for some.
_VALIDATION_SETTINGS = (
    "early_stopping_patience",
    "eval_every_steps",
    "eval_batch_size",
    "metric_for_best",
)


def _check_validation_settings(hyper: dict[str, Any], has_validation_file: bool) -> None:
    """Refuse a setting that acts on validation in a job that has none (no validation_file,
    validation_fraction 0): it was accepted and could never act."""
    if has_validation_file or parse_training_config(dict(hyper)).validation_fraction > 0:
        return
    for name in _VALIDATION_SETTINGS:
        if hyper.get(name) is None:
            continue
        param = f"method.hyperparameters.{name}"
        raise invalid(
            f"{param}: this job has no validation set (no validation_file, and "
            f"validation_fraction is 0), so {name} would never act; give a validation_file or "
            "a validation_fraction above 0.",
            param,
            "setting_not_read",
        )


def _reference_adapter(
    session: Session,
    tenant_id: str,
    name: str | None,
    task: str | None,
    base: BaseSpec,
    method: dict[str, Any],
) -> dict[str, Any] | None:
    """The job's method block for a DPO job with a ``reference_adapter`` (checked: the
    tenant's, a chat adapter of the job's base, of the job's method type), or None without one
    (also when the training file does not exist: that 404 comes later, as for any job).

    The policy starts from the reference's weights, so it trains the reference's method config:
    the block gets the reference's parameters (what the request left out is inherited, as
    OpenAI's ``dpo`` type, which carries none, needs) and the reference pinned by id; a
    parameter the request set to another value than the reference's is refused, naming it.
    """
    if name is None or task is None:
        return None
    param = "reference_adapter"
    if task != "dpo":
        raise invalid(
            f"reference_adapter is DPO's reference policy; this job trains {task}.",
            param,
            "setting_not_read",
        )
    row = find_adapter_row(session, tenant_id, name)
    if row is None:
        raise not_found("adapter", name, param)
    if row.base_model != base.name:
        raise invalid(
            f"reference_adapter '{name}' was trained on {row.base_model}; this job trains on "
            f"{base.name}.",
            param,
            "adapter_base_mismatch",
        )
    if row.task != "chat":
        raise invalid(
            f"reference_adapter '{name}' is a {row.task} adapter; DPO's reference is a chat "
            "(supervised fine-tuning) adapter.",
            param,
            "reference_adapter_task",
        )
    method_type = method["type"]
    if row.method != method_type:
        raise invalid(
            f"reference_adapter '{name}' is a {row.method} adapter; the policy starts from its "
            f"weights, so the job's method.type must be '{row.method}' too.",
            param,
            "reference_adapter_method",
        )
    own = {k: v for k, v in row.config["method"].items() if k != "type"}
    given = method.get(method_type) or {}
    reference = parse_method_config(method_type, own, base.kind)
    wanted = parse_method_config(method_type, {**own, **given}, base.kind)
    for field in given:
        if getattr(wanted, field) != getattr(reference, field):
            param = f"method.{method_type}.{field}"
            raise invalid(
                f"{param} is {given[field]!r}, but reference_adapter '{name}' has "
                f"{getattr(reference, field)!r}: the policy starts from its weights, so it "
                f"trains its {method_type} config; leave {param} out to use it.",
                param,
                "reference_adapter_method",
            )
    return {**method, method_type: own, "reference_adapter": row.id}


_HYPERPARAMETERS_PARAM = ".".join(HYPERPARAMETERS_PATH) + "."


@contextmanager
def _named_as_sent(sent_paths: Mapping[str, SentPath]) -> Iterator[None]:
    """Errors about a hyperparameter name it where the client sent it: the request keeps them
    all in method.hyperparameters, and the checks name that path."""
    try:
        yield
    except ServiceError as e:
        rest = (e.param or "").removeprefix(_HYPERPARAMETERS_PARAM)
        key, dot, below = rest.partition(".")
        if rest == e.param or key not in sent_paths:
            raise
        sent = ".".join(sent_paths[key]) + dot + below
        if e.message.startswith(f"{e.param}:"):
            e.message = sent + e.message.removeprefix(e.param)
            e.args = (e.message,)
        e.param = sent
        raise


def create_job(session: Session, tenant: Tenant, body: JobRequest, settings: Settings) -> Job:
    with _named_as_sent(body.sent_paths):
        return _create_job(session, tenant, body, settings)


def _create_job(session: Session, tenant: Tenant, body: JobRequest, settings: Settings) -> Job:
    # The training file's kind decides the task, and the task the kind of base: ``model``
    # picks the base (404 for one this deployment does not configure), by default the first
    # of the kind that trains the task.
    task = _training_task(session, tenant.id, body.training_file)
    base = _job_base(settings, body.model, task)
    model = base.name
    try:
        validate_method(
            {**body.method, "hyperparameters": body.hyperparameters},
            base_limits(base),
            base.kind,
            task,
        )
    except MethodConfigError as exc:
        # validate_method names fields inside the method block; the request's field is method.*
        param = f"method.{exc.param}" if exc.param else "method"
        raise MethodConfigError(exc.message, param=param) from exc
    _check_task_settings(task, body.hyperparameters)
    _check_validation_settings(body.hyperparameters, body.validation_file is not None)
    # The tenant's lock, held to the commit, before the reference adapter and the files are
    # read: a delete of either (which takes it too) then ends before they are read, or waits
    # until the job is stored, which it then refuses to delete.
    lock_tenant(session, tenant.id)
    with_reference = _reference_adapter(
        session, tenant.id, body.reference_adapter, task, base, body.method
    )

    _check_quotas(session, tenant.id, settings)
    adapter_name = _adapter_name(session, tenant.id, body)

    job = Job(
        tenant_id=tenant.id,
        status=JobStatus.VALIDATING_FILES,
        model=model,
        # The reference adapter is pinned by id: the job trains against the weights checked
        # here, whatever is later stored under the name.
        method=body.method if with_reference is None else with_reference,
        hyperparameters=body.hyperparameters,
        # What the job object echoes as the client sent it (the method block holds what
        # training reads: LoRA, the reference's id); the name is kept with the id it pinned.
        openai_method=body.openai_method,
        reference_adapter_name=None if with_reference is None else body.reference_adapter,
        training_file=body.training_file,
        validation_file=body.validation_file,
        adapter_name=adapter_name,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
    )
    # Another request may reserve the same adapter name between our check and the insert.
    taken = conflict(
        f"An adapter or active job already uses the name '{adapter_name}'.",
        "adapter_name",
        "adapter_name_taken",
    )
    with committed_or_conflict(session, taken):
        session.add(job)
        session.flush()
        add_event(session, job, f"Validating training file: {body.training_file}")
        training = _load_dataset(session, tenant.id, body.training_file, "training_file")
        validation = (
            _load_dataset(session, tenant.id, body.validation_file, "validation_file")
            if body.validation_file
            else None
        )
        _check_files(training, validation, body.openai_method)
        config = parse_training_config(dict(job.hyperparameters))
        _check_steps(config, training, validation is not None, settings)
        job.status = JobStatus.QUEUED
        add_event(
            session,
            job,
            "Files validated; job queued" + _hold_out_note(config, validation is not None),
            data={
                "training_rows": training.row_count,
                "validation_rows": validation.row_count if validation else None,
            },
        )
    return job

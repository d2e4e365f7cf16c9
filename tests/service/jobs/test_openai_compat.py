"""Mapping the OpenAI SDK's job body onto loraplex's (``service.jobs.openai_compat``)."""

from __future__ import annotations

from typing import Any

import pytest

from core.training.config import DEFAULT_LEARNING_RATES
from service.errors import ErrorKind, ServiceError
from service.jobs.openai_compat import openai_job_hyperparameters, translate_job_request


def translate(body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    out = translate_job_request({"training_file": "file-1", **body})
    return out.body, out.openai_method


def test_no_method_is_default_lora_without_a_data_kind() -> None:
    body, openai_type = translate({})
    assert body["method"] == {"type": "lora"} and openai_type is None


def test_supervised_and_dpo_become_lora() -> None:
    body, openai_type = translate(
        {
            "method": {
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": "auto"}},
            }
        }
    )
    assert openai_type == "supervised"
    assert body["method"] == {"type": "lora", "hyperparameters": {"n_epochs": 3}}
    body, openai_type = translate({"method": {"type": "dpo", "dpo": {"hyperparameters": None}}})
    assert openai_type == "dpo" and body["method"] == {"type": "lora", "hyperparameters": {}}
    # DPO's beta is loraplex's beta (job creation refuses it on a reward model).
    body, _ = translate({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}})
    assert body["method"] == {"type": "lora", "hyperparameters": {"beta": 0.2}}


def test_each_moved_hyperparameter_keeps_the_path_it_was_sent_at() -> None:
    out = translate_job_request(
        {
            "method": {
                "type": "dpo",
                "dpo": {"hyperparameters": {"beta": 0.2, "learning_rate_multiplier": 2}},
                "hyperparameters": {"seed": 3},
            },
            "hyperparameters": {"n_epochs": 2, "batch_size": "auto"},
        }
    )
    assert out.sent_paths == {
        "beta": ("method", "dpo", "hyperparameters", "beta"),
        "learning_rate": ("method", "dpo", "hyperparameters", "learning_rate_multiplier"),
        "n_epochs": ("hyperparameters", "n_epochs"),
    }  # seed stays where it was sent; "auto" is not sent at all
    assert translate_job_request({"method": {"type": "lora"}}).sent_paths == {}


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (
            {
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"learning_rate_multiplier": 2}},
                    "hyperparameters": {"learning_rate": 1e-3},
                }
            },
            "method.hyperparameters.learning_rate",
            "method.hyperparameters.learning_rate: sets learning_rate, as "
            "method.supervised.hyperparameters.learning_rate_multiplier does; give it once.",
        ),
        (
            {
                "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2}}},
                "hyperparameters": {"n_epochs": 3},
            },
            "hyperparameters.n_epochs",
            "hyperparameters.n_epochs: sets n_epochs, as method.dpo.hyperparameters.n_epochs "
            "does; give it once.",
        ),
    ],
)
def test_a_setting_given_twice_names_both_places(
    body: dict[str, Any], param: str, message: str
) -> None:
    with pytest.raises(ServiceError) as info:
        translate(body)
    assert (info.value.param, info.value.message) == (param, message)


def test_learning_rate_multiplier_scales_the_methods_default() -> None:
    body, _ = translate(
        {"method": {"type": "full"}, "hyperparameters": {"learning_rate_multiplier": 0.5}}
    )
    assert body["method"]["hyperparameters"] == {
        "learning_rate": pytest.approx(DEFAULT_LEARNING_RATES["full"] * 0.5)
    }
    assert "hyperparameters" not in body  # moved into the method block


def test_loraplex_methods_pass_through() -> None:
    method = {"type": "adapter", "adapter": {"bottleneck_size": 16}, "hyperparameters": {"x": 1}}
    body, openai_type = translate({"method": method})
    assert body["method"] == method and openai_type is None


def test_empty_integrations_and_metadata_are_dropped() -> None:
    body, _ = translate({"integrations": [], "metadata": None})
    assert "integrations" not in body and "metadata" not in body


@pytest.mark.parametrize(
    ("body", "kind", "param"),
    [
        ({"method": {"type": "reinforcement"}}, ErrorKind.UNSUPPORTED, "method.type"),
        ({"integrations": [{"type": "wandb"}]}, ErrorKind.UNSUPPORTED, "integrations"),
        ({"metadata": {"k": "v"}}, ErrorKind.UNSUPPORTED, "metadata"),
        (
            {"method": {"type": "supervised", "supervised": 3}},
            ErrorKind.INVALID,
            "method.supervised",
        ),
        (
            {"method": {"type": "supervised", "supervised": {"lora": {}}}},
            ErrorKind.INVALID,
            "method.supervised.lora",
        ),
        ({"method": {"type": "supervised", "lora": {"r": 4}}}, ErrorKind.INVALID, "method.lora"),
        (
            {"hyperparameters": {"learning_rate_multiplier": -1}},
            ErrorKind.INVALID,
            "hyperparameters.learning_rate_multiplier",
        ),
        (
            {"hyperparameters": {"learning_rate_multiplier": 2, "learning_rate": 0.1}},
            ErrorKind.INVALID,
            "hyperparameters.learning_rate_multiplier",
        ),
        (
            {
                "method": {"type": "lora", "hyperparameters": {"n_epochs": 2}},
                "hyperparameters": {"n_epochs": 3},
            },
            ErrorKind.INVALID,
            "hyperparameters.n_epochs",  # the second of the two places
        ),
    ],
)
def test_what_cannot_be_mapped(body: dict[str, Any], kind: ErrorKind, param: str) -> None:
    with pytest.raises(ServiceError) as info:
        translate(body)
    assert info.value.kind is kind and info.value.param == param


def test_openai_blocks_beside_another_method_type_are_a_validation_error() -> None:
    """Schemathesis found this body answered with a 500: the "auto" learning-rate multiplier
    in a dpo block that did not belong to the method type."""
    from pydantic import ValidationError

    from service.api.schemas.jobs import JobCreate

    method = {
        "type": "lora",
        "dpo": {"hyperparameters": {"learning_rate_multiplier": "auto", "beta": None}},
        "supervised": {"hyperparameters": {"n_epochs": 3}},
    }
    with pytest.raises(ValidationError, match="parameters given under 'supervised'"):
        JobCreate.model_validate({"training_file": "file-1", "method": method})
    # In its own block, "auto" is the method's default learning rate.
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"learning_rate_multiplier": "auto"}}}
    job = JobCreate.model_validate({"training_file": "file-1", "method": dpo})
    assert job.method.type == "lora" and job.openai_method == "dpo"
    assert "learning_rate" not in job.method.stored_hyperparameters()


def test_the_job_object_shows_openai_s_hyperparameters_as_sent_then_as_used() -> None:
    sent, _ = translate(
        {
            "method": {
                "type": "dpo",
                "dpo": {"hyperparameters": {"learning_rate_multiplier": 7.85, "n_epochs": "auto"}},
            }
        }
    )
    hyper = sent["method"]["hyperparameters"]
    # The multiplier comes back as sent, not as the division's 7.849999999999999.
    assert openai_job_hyperparameters("dpo", hyper, None) == {
        "n_epochs": "auto",
        "batch_size": "auto",
        "learning_rate_multiplier": 7.85,
        "beta": "auto",
    }
    resolved = {"n_epochs": 2, "batch_size": 16, "learning_rate": 5e-4, "beta": 0.1, "x": 1}
    assert openai_job_hyperparameters("dpo", hyper, resolved) == {
        "n_epochs": 2,
        "batch_size": 16,
        "learning_rate_multiplier": 0.5,
        "beta": 0.1,
    }
    # supervised has no beta; loraplex's "auto" learning rate is OpenAI's "auto" multiplier.
    assert openai_job_hyperparameters("supervised", {"learning_rate": "auto"}, None) == {
        "n_epochs": "auto",
        "batch_size": "auto",
        "learning_rate_multiplier": "auto",
    }

"""What the OpenAI SDK sends to ``POST /fine_tuning/jobs``, mapped onto loraplex's job body.

``client.fine_tuning.jobs.create(...)`` sends ``model``, ``training_file`` and whichever of
``validation_file``, ``suffix``, ``seed``, ``method``, ``hyperparameters`` (deprecated),
``integrations`` and ``metadata`` the caller set. The SDK's typed ``method.type`` is one of
``supervised``, ``dpo``, ``reinforcement``, but it passes any dict through, so loraplex's own
method blocks (``{"type": "lora", "lora": {...}, "hyperparameters": {...}}``) work as they are.

OpenAI's method types map onto loraplex as:

- ``supervised`` → LoRA with default parameters: chat SFT on a decoder base with a chat
  dataset (OpenAI's ``{"messages": [...]}`` rows), a classifier on an encoder base with a
  classification dataset (text + label);
- ``dpo`` → LoRA with default parameters: DPO on a decoder base with a dpo dataset (OpenAI's
  ``input`` / ``preferred_output`` / ``non_preferred_output`` rows), a reward model on an
  encoder base with a preference dataset (chosen + rejected);
- ``reinforcement`` → refused (400): there is no policy to optimise;
- no ``method`` → LoRA with default parameters, on either kind of data.

Their ``hyperparameters`` map ``n_epochs`` and ``batch_size`` as they are and
``learning_rate_multiplier`` onto the method's default learning rate; ``"auto"`` means the default.
DPO's ``beta`` passes through as loraplex's ``beta``, which job creation refuses on a reward
model (it has no counterpart there). Other keys pass through to loraplex's hyperparameters
(checked by the core trainer).

The job keeps OpenAI's type, and its job object echoes it in OpenAI's shape
(``{"type": "dpo", "dpo": {"hyperparameters": {...}}}``, see
:func:`openai_job_hyperparameters`), with the LoRA block beside it.

Features loraplex does not offer (``integrations``, ``metadata``, ``reinforcement``) are
``unsupported`` errors (400s, as OpenAI answers for features it lacks); malformed values stay
``invalid`` (422s).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from pydantic import ValidationError

from core.training.config import TrainingConfig
from service.errors import invalid, unsupported

OPENAI_METHOD_TYPES = ("supervised", "dpo")
# The dataset kinds each OpenAI method type trains on: the decoder's (OpenAI's own files) and
# the encoder's.
OPENAI_METHOD_KINDS: dict[str, tuple[str, ...]] = {
    "supervised": ("chat", "classification"),
    "dpo": ("dpo", "preference"),
}
_AUTO = "auto"
SentPath = tuple[str, ...]  # a field's location in the request body, key by key
# OpenAI's hyperparameters of each method type, as its job object shows them (the SDK's
# SupervisedHyperparameters and DpoHyperparameters).
_OPENAI_JOB_HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "supervised": ("n_epochs", "batch_size", "learning_rate_multiplier"),
    "dpo": ("n_epochs", "batch_size", "learning_rate_multiplier", "beta"),
}
# learning_rate_multiplier is shown to this many significant digits: the learning rate it
# maps onto is the multiplier times LoRA's default, and dividing back is not always exact
# (1e-3 * 7.85 / 1e-3 is 7.849999999999999).
_MULTIPLIER_DIGITS = 12


def learning_rate_multiplier(rate: Any, method_type: str) -> Any:
    """OpenAI's view of a learning rate: over ``method_type``'s default (``"auto"`` stays so),
    the inverse of what :func:`openai_hyperparameters` maps a multiplier onto."""
    if rate == _AUTO:
        return rate
    auto = TrainingConfig().resolved_learning_rate(method_type)
    return float(f"{float(rate) / auto:.{_MULTIPLIER_DIGITS}g}")


def openai_hyperparameters(value: Any, param: str, *, method_type: str = "lora") -> dict[str, Any]:
    """OpenAI's hyperparameter block → loraplex's (``"auto"`` values dropped).

    ``learning_rate_multiplier`` scales ``method_type``'s default learning rate.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"{param} must be an object.", param)
    out: dict[str, Any] = {}
    for key, item in value.items():
        if item is None or item == _AUTO:
            continue
        if key == "learning_rate_multiplier":
            where = f"{param}.{key}"
            ok = isinstance(item, int | float) and not isinstance(item, bool)
            if not ok or not math.isfinite(item) or item <= 0:
                raise invalid(f"{where} must be a positive number or 'auto'.", where)
            if "learning_rate" in value and value["learning_rate"] not in (None, _AUTO):
                raise invalid(
                    f"{param}: give learning_rate or learning_rate_multiplier, not both.",
                    f"{param}.{key}",
                )
            auto = TrainingConfig().resolved_learning_rate(method_type)
            rate = auto * float(item)
            try:
                TrainingConfig(learning_rate=rate)
            except ValidationError as e:
                # Named here: past this point the error would name learning_rate, unsent.
                bound = e.errors()[0]["msg"].removeprefix("Input should be ")
                raise invalid(
                    f"{where}: {item} x the default learning rate {auto:g} is {rate:g}; the "
                    f"learning rate should be {bound}.",
                    where,
                ) from None
            out["learning_rate"] = rate
        else:
            out[key] = item
    return out


# Where loraplex's own hyperparameters are sent, and where a translated request keeps them all.
HYPERPARAMETERS_PATH: SentPath = ("method", "hyperparameters")


def _sent_paths(value: Any, block: SentPath) -> dict[str, SentPath]:
    """Where each hyperparameter of :func:`openai_hyperparameters`' result was sent."""
    if not isinstance(value, dict):
        return {}
    return {
        "learning_rate" if key == "learning_rate_multiplier" else key: (*block, key)
        for key, item in value.items()
        if item is not None and item != _AUTO
    }


def openai_job_hyperparameters(
    openai_type: str, sent: dict[str, Any], resolved: dict[str, Any] | None
) -> dict[str, Any]:
    """The job object's ``method.<openai_type>.hyperparameters``, as OpenAI's shows them.

    Each of OpenAI's settings as the run uses it once a worker has set the job up
    (``resolved``), before that as the request set it (``sent``, loraplex's names), else
    ``"auto"``. ``learning_rate_multiplier`` is the learning rate over LoRA's default: the
    inverse of what :func:`openai_hyperparameters` maps it onto.
    """
    values = {**sent, **(resolved or {})}
    out: dict[str, Any] = {}
    for key in _OPENAI_JOB_HYPERPARAMETERS[openai_type]:
        if key == "learning_rate_multiplier":
            out[key] = learning_rate_multiplier(values.get("learning_rate", _AUTO), "lora")
        else:
            out[key] = values.get(key, _AUTO)
    return out


def _merge(
    first: dict[str, Any],
    first_paths: dict[str, SentPath],
    second: dict[str, Any],
    second_paths: dict[str, SentPath],
) -> dict[str, Any]:
    """Two hyperparameter blocks in one, refusing a setting both set (``*_paths``: where each
    key was sent, when not in loraplex's own block)."""
    twice = sorted(set(first) & set(second))
    if twice:
        key = twice[0]
        one = ".".join(first_paths.get(key, (*HYPERPARAMETERS_PATH, key)))
        other = ".".join(second_paths.get(key, (*HYPERPARAMETERS_PATH, key)))
        raise invalid(f"{other}: sets {key}, as {one} does; give it once.", other)
    return {**first, **second}


def _translate_method(
    method: dict[str, Any],
) -> tuple[dict[str, Any], str | None, dict[str, SentPath]]:
    """(loraplex method block, the OpenAI type it came from or None, the sent paths)."""
    method_type = method.get("type")
    if method_type == "reinforcement":
        raise unsupported(
            "method.type 'reinforcement' is not supported: loraplex trains chat SFT, DPO, "
            "classifiers and reward models. Use 'supervised', 'dpo' or a loraplex method "
            "(lora, adapter, prompt_tuning, feature_extraction, full).",
            "method.type",
            "unsupported_method",
        )
    if method_type not in OPENAI_METHOD_TYPES:
        return method, None, {}
    block = method.get(method_type)
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise invalid(f"method.{method_type} must be an object.", f"method.{method_type}")
    unknown = sorted(set(block) - {"hyperparameters"})
    if unknown:
        raise invalid(
            f"method.{method_type}.{unknown[0]}: only 'hyperparameters' is accepted here.",
            f"method.{method_type}.{unknown[0]}",
        )
    other = sorted(set(method) - {"type", method_type, "hyperparameters"})
    if other:
        raise invalid(
            f"method.{other[0]}: parameters for '{other[0]}' do not apply to method.type "
            f"'{method_type}' (which trains LoRA with default parameters; send type 'lora' "
            "to set them).",
            f"method.{other[0]}",
        )
    where: SentPath = ("method", method_type, "hyperparameters")
    hyper = openai_hyperparameters(block.get("hyperparameters"), ".".join(where))
    sent_paths = _sent_paths(block.get("hyperparameters"), where)
    own = method.get("hyperparameters") or {}
    if not isinstance(own, dict):
        raise invalid("method.hyperparameters must be an object.", "method.hyperparameters")
    merged = _merge(hyper, sent_paths, own, {})
    return {"type": "lora", "hyperparameters": merged}, method_type, sent_paths


class Translation(NamedTuple):
    body: Any  # the request in loraplex's shape
    openai_method: str | None  # the OpenAI method type it used, if any
    # loraplex hyperparameter name → the path the client sent it at, for those sent elsewhere
    # than method.hyperparameters (so a 422 names what was sent)
    sent_paths: dict[str, SentPath]


def translate_job_request(data: Any) -> Translation:
    """The request in loraplex's shape; non-dicts pass unchanged.

    Raises :class:`service.errors.ServiceError` for what cannot be mapped (see the module
    docstring).
    """
    if not isinstance(data, dict):
        return Translation(data, None, {})
    body = dict(data)
    for key in ("integrations", "metadata"):
        if body.get(key):
            raise unsupported(f"{key} is not supported by loraplex; leave it out.", key)
        body.pop(key, None)
    # No method: LoRA with default parameters, on whichever kind of data the file holds.
    method = body.get("method")
    if method is None:
        method = {"type": "lora"}
    openai_type, sent_paths = None, {}
    if isinstance(method, dict):
        method, openai_type, sent_paths = _translate_method(method)
        method_type = method.get("type")
        deprecated = body.pop("hyperparameters", None)
        top = openai_hyperparameters(
            deprecated,
            "hyperparameters",
            method_type=method_type if isinstance(method_type, str) else "lora",
        )
        if top:
            own = method.get("hyperparameters") or {}
            if isinstance(own, dict):
                top_paths = _sent_paths(deprecated, ("hyperparameters",))
                merged = _merge(own, sent_paths, top, top_paths)
                method = {**method, "hyperparameters": merged}
                sent_paths = {**sent_paths, **top_paths}
    body["method"] = method
    return Translation(body, openai_type, sent_paths)

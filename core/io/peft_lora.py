"""LoRA in PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` layout.

Our LoRA state names are already PEFT's module paths for a ``BertModel``
(``encoder.layer.0.attention.self.query.lora_A.weight``) or a ``LlamaForCausalLM``
(``model.layers.0.self_attn.q_proj.lora_A.weight``); PEFT saves them under
``base_model.model.`` without the adapter name. Import reads either kind's names, by the kind
of the base it imports onto.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from core.adapter import base_kind_of
from core.base import FrozenBase
from core.decoder.base import DecoderBase
from core.errors import AdapterFormatError, ConfigError
from core.methods import parse_method_config
from core.methods.lora.config import LoraConfig
from core.methods.lora.model import lora_key
from core.targets import (
    DECODER_TARGET_PATHS,
    TARGET_MODULES_BY_KIND,
    TARGET_PATHS,
    BaseKind,
    module_path,
)

PEFT_PREFIX = "base_model.model."
# Each kind's linear layers: sub-path in a layer -> our target name.
_TARGET_BY_PATH: dict[BaseKind, dict[str, str]] = {
    "encoder": {path: target for target, path in TARGET_PATHS.items()},
    "decoder": {path: target for target, path in DECODER_TARGET_PATHS.items()},
}

# base_model.model. + optional bert./model. (BertFor* or wrapped models) + encoder path +
# lora_A/B + optional adapter name (in-memory state dicts carry ``.default``).
_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:bert\.|model\.)?encoder\.layer\.(?P<layer>\d+)\."
    r"(?P<path>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)
# PEFT's "all-linear" also wraps BERT's pooler, which loraplex never runs: such LoRA
# matrices cannot change anything we compute, so they are dropped on import.
_POOLER_KEY = re.compile(r"^(?:base_model\.model\.)?(?:bert\.|model\.)?pooler\.dense\.lora_")
# A causal LM's: base_model.model. + LlamaForCausalLM's model.layers.N + sub-path.
_DECODER_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(?P<layer>\d+)\."
    r"(?P<path>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)

# PEFT features our LoRA does not implement; any truthy value is refused.
_UNSUPPORTED = ("use_dora", "fan_in_fan_out", "lora_bias", "layer_replication", "target_parameters")


def _peft_target_modules(
    cfg: LoraConfig, num_layers: int, kind: BaseKind
) -> tuple[list[str] | str, Any]:
    """``(target_modules, layers_to_transform)`` that make PEFT wrap exactly our sites.

    PEFT matches list entries as module-name suffixes, so ``output.dense`` would also hit
    ``attention.output.dense``. Without the feed-forward output, full sub-paths
    (``attention.self.query``) are unambiguous; with it, a regex (PEFT full-matches strings)
    that also carries the layer list, since PEFT forbids ``layers_to_transform`` with a regex.
    A decoder's sub-paths (``self_attn.q_proj``) are always unambiguous.
    """
    if kind == "decoder":
        return [DECODER_TARGET_PATHS[t] for t in cfg.target_modules], cfg.layers
    paths = [TARGET_PATHS[t] for t in cfg.target_modules]
    if "output.dense" not in cfg.target_modules:
        return paths, cfg.layers
    layers = cfg.layers if cfg.layers is not None else range(num_layers)
    layer_alt = "|".join(str(i) for i in layers)
    path_alt = "|".join(re.escape(p) for p in paths)
    return rf"(?:.*\.)?encoder\.layer\.(?:{layer_alt})\.(?:{path_alt})", None


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def export_lora(
    cfg: LoraConfig, state: dict[str, Tensor], base: FrozenBase | DecoderBase
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """PEFT's config and tensors of our LoRA; our state names are already the Hugging Face
    module paths of the base (``BertModel``'s, or ``LlamaForCausalLM``'s ``model.layers...``)."""
    kind = base_kind_of(base)
    target_modules, layers = _peft_target_modules(cfg, base.num_layers, kind)
    config = {
        "peft_type": "LORA",
        # A decoder's adapter is loaded on the causal LM whose head it was trained through.
        "task_type": "CAUSAL_LM" if kind == "decoder" else "FEATURE_EXTRACTION",
        "r": cfg.r,
        "lora_alpha": _number(cfg.alpha),
        "lora_dropout": cfg.dropout,
        "target_modules": target_modules,
        "layers_to_transform": layers,
        "use_rslora": cfg.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    return config, {PEFT_PREFIX + k: v for k, v in state.items()}


def _check_supported(cfg: dict[str, Any]) -> None:
    for key in _UNSUPPORTED:
        if cfg.get(key):
            raise AdapterFormatError(f"PEFT option {key}={cfg[key]!r} is not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterFormatError(f"PEFT option bias={cfg['bias']!r} is not supported (only 'none')")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise AdapterFormatError(f"PEFT option {key} (per-module ranks) is not supported")
    if cfg.get("modules_to_save"):
        raise AdapterFormatError(
            f"PEFT modules_to_save {cfg['modules_to_save']} is not supported: only the encoder's "
            "LoRA matrices are imported (pass a head config to train a new head)"
        )


def _parse_keys(
    tensors: dict[str, Tensor], kind: BaseKind
) -> dict[tuple[int, str], dict[str, tuple[str, Tensor]]]:
    """``{(layer, target): {"A"|"B": (original key, tensor)}}`` of a ``kind`` base's LoRA;
    unknown keys are errors."""
    sites: dict[tuple[int, str], dict[str, tuple[str, Tensor]]] = {}
    unknown: list[str] = []
    by_path = _TARGET_BY_PATH[kind]
    pattern = _LORA_KEY if kind == "encoder" else _DECODER_LORA_KEY
    for key, t in tensors.items():
        m = pattern.match(key)
        if m is None or m["path"] not in by_path:
            if kind == "decoder" or not _POOLER_KEY.match(key):
                unknown.append(key)
            continue
        site = (int(m["layer"]), by_path[m["path"]])
        if m["which"] in sites.setdefault(site, {}):
            raise AdapterFormatError(f"duplicate LoRA weights for {key!r}")
        sites[site][m["which"]] = (key, t)
    if unknown:
        raise AdapterFormatError(
            f"unsupported tensors in PEFT weights: {sorted(unknown)[:4]} (only LoRA matrices of "
            f"the {kind}'s linear layers {list(by_path)} can be imported)"
        )
    if not sites:
        raise AdapterFormatError("PEFT weights contain no LoRA matrices")
    return sites


def _selects(target_modules: list[str] | str, name: str) -> bool:
    """PEFT's rule: a string is a regex the module name must fully match; list entries match
    the name or a dotted suffix of it. Names are tried with the prefixes a model wrapping
    the encoder (``BertFor*``) gives them."""
    names = (name, f"bert.{name}", f"model.{name}")
    if isinstance(target_modules, str):
        return any(re.fullmatch(target_modules, n) for n in names)
    return any(n == t or n.endswith(f".{t}") for n in names for t in target_modules)


def _layers_to_transform(cfg: dict[str, Any], base: FrozenBase | DecoderBase) -> list[int] | None:
    layers = cfg.get("layers_to_transform")
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]  # PEFT takes a single index too
    if not isinstance(layers, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in layers
    ):
        raise AdapterFormatError(f"PEFT layers_to_transform={layers!r} is not a list of ints")
    outside = sorted({i for i in layers if not 0 <= i < base.num_layers})
    if outside:
        raise AdapterFormatError(
            f"PEFT layers_to_transform {outside} out of range: base {base.name!r} has "
            f"layers 0 to {base.num_layers - 1}"
        )
    return layers


def _target_modules(cfg: dict[str, Any], base: FrozenBase | DecoderBase) -> list[str] | str | None:
    """The config's ``target_modules`` (None: every linear), each entry checked to name at
    least one linear layer of ``base``."""
    targets = cfg.get("target_modules")
    if targets is None or targets == "all-linear":
        return None
    if isinstance(targets, str):
        try:
            re.compile(targets)
        # re raises OverflowError for a repeat count past its limit ("a{4294967296}") and
        # RecursionError for thousands of nested groups.
        except (re.error, OverflowError, RecursionError) as e:
            raise AdapterFormatError(f"PEFT target_modules {targets!r} is no regex: {e}") from None
    elif not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterFormatError(f"PEFT target_modules={targets!r} is not a list of names")
    kind = base_kind_of(base)
    linears = list(_TARGET_BY_PATH[kind])
    modules = [
        module_path(i, t) for i in range(base.num_layers) for t in TARGET_MODULES_BY_KIND[kind]
    ]
    if kind == "encoder":
        # The pooler is in PEFT's all-linear; its LoRA matrices are dropped (see _POOLER_KEY).
        linears.append("pooler.dense")
        modules.append("pooler.dense")
    entries = [targets] if isinstance(targets, str) else targets
    unknown = [
        t for t in entries
        if not any(_selects(t if isinstance(targets, str) else [t], m) for m in modules)
    ]  # fmt: skip
    if unknown:
        raise AdapterFormatError(
            f"PEFT target_modules {unknown} name no linear layer of base {base.name!r} "
            f"(its linear layers: {linears})"
        )
    return targets


def _check_selection(
    cfg: dict[str, Any], sites: dict[tuple[int, str], Any], base: FrozenBase | DecoderBase
) -> None:
    """``target_modules`` and ``layers_to_transform`` must name parts of ``base`` and select
    every site the weights hold: a config that does not describe its weights is refused
    rather than ignored."""
    layers = _layers_to_transform(cfg, base)
    targets = _target_modules(cfg, base)
    for i, target in sorted(sites):
        name = module_path(i, target)
        if (targets is not None and not _selects(targets, name)) or (
            layers is not None and i not in layers
        ):
            raise AdapterFormatError(
                f"PEFT weights hold LoRA matrices for {name}, which the config's "
                f"target_modules={cfg.get('target_modules')!r} and layers_to_transform="
                f"{cfg.get('layers_to_transform')!r} do not select"
            )


def import_lora(
    cfg: dict[str, Any], tensors: dict[str, Tensor], base: FrozenBase | DecoderBase
) -> tuple[LoraConfig, dict[str, Tensor]]:
    """Our LoRA config and state from a PEFT LoRA adapter, checked against ``base`` (an
    encoder's ``FEATURE_EXTRACTION`` adapter, or a decoder's ``CAUSAL_LM`` one)."""
    _check_supported(cfg)
    kind = base_kind_of(base)
    sites = _parse_keys(tensors, kind)
    n_layers = base.num_layers
    too_deep = sorted({i for i, _ in sites if i >= n_layers})
    if too_deep:
        raise AdapterFormatError(
            f"adapter has LoRA weights for layer {too_deep[-1]} but base {base.name!r} has "
            f"{n_layers} layers: it was trained for a different base model"
        )
    _check_selection(cfg, sites, base)
    layers = sorted({i for i, _ in sites})
    targets = sorted({t for _, t in sites}, key=TARGET_MODULES_BY_KIND[kind].index)
    missing = [(i, t) for i in layers for t in targets if (i, t) not in sites]
    if missing:
        raise AdapterFormatError(
            "LoRA sites must be the same target modules in every adapted layer; "
            f"missing {missing[:4]}"
        )

    state: dict[str, Tensor] = {}
    ranks: set[int] = set()
    for (i, target), pair in sorted(sites.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterFormatError(f"layer {i} {target}: lora_A and lora_B must both be present")
        n_in, n_out = base.config.linear_shape(target)
        (key_a, a), (key_b, b) = pair["A"], pair["B"]
        # The rank is read off lora_A, so anything but a matrix is refused before that.
        for key, t in ((key_a, a), (key_b, b)):
            if t.ndim != 2:
                raise AdapterFormatError(f"{key}: a LoRA matrix, got shape {tuple(t.shape)}")
        r = a.shape[0]
        ranks.add(r)
        for key, t, want in ((key_a, a, (r, n_in)), (key_b, b, (n_out, r))):
            if tuple(t.shape) != want:
                raise AdapterFormatError(
                    f"{key}: shape {tuple(t.shape)} does not fit base {base.name!r} (expects "
                    f"{want}; hidden size {base.hidden_size}): the adapter was trained for a "
                    "different base model"
                )
        state[lora_key(i, target, "A")] = a
        state[lora_key(i, target, "B")] = b
    rank = min(ranks)
    # Compared, not put in a set: the config's r may be any JSON value, a list too.
    if len(ranks) != 1 or cfg.get("r", rank) != rank:
        raise AdapterFormatError(
            f"LoRA ranks {sorted(ranks)} in the weights disagree with r={cfg.get('r')} "
            "in the config"
        )
    params = {
        "r": rank,
        "alpha": cfg.get("lora_alpha", 8),  # PEFT's default
        "dropout": cfg.get("lora_dropout", 0.0),
        "target_modules": targets,
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "layers": None if layers == list(range(n_layers)) else layers,
    }
    try:
        method = parse_method_config("lora", params, kind)
    except ConfigError as e:
        raise AdapterFormatError(f"PEFT LoRA config not supported: {e}") from None
    assert isinstance(method, LoraConfig)
    if not method.scaling <= torch.finfo(torch.float32).max:  # inf, and NaN, fail too
        raise AdapterFormatError(
            f"PEFT lora_alpha={method.alpha} makes the LoRA scaling {method.scaling:g}, "
            "past what float32 weights can hold"
        )
    return method, state

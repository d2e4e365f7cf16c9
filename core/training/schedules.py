"""Learning-rate schedules, discriminative (layer-wise) parameter groups, gradual unfreezing."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from core.methods.method import AdapterMethod


def lr_lambda(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step ``step`` (0-based), for ``LambdaLR``.

    Same formulas as Hugging Face's ``get_{linear,cosine,constant}_schedule_with_warmup``:
    linear warm-up from 0 over ``warmup_steps``, then linear decay to 0 at ``total_steps``, a
    half cosine to 0, or constant.
    """
    if kind not in ("linear", "cosine", "constant"):
        raise ValueError(f"unknown lr_scheduler {kind!r}")

    def fn(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))

    return fn


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # Biases and LayerNorm gains are not decayed (as in BERT's recipe); neither are any other
    # vectors, which are gains/offsets by construction.
    return p.ndim < 2 or name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name


def param_layers(method: AdapterMethod, head: nn.Module | None) -> dict[str, int | None]:
    """Layer of every trainable parameter, keyed ``method.<name>`` / ``head.<name>``.

    From ``method.param_layer``: -1 embeddings, 0..L-1 encoder layers, None top (full lr).
    Head parameters are always top; a decoder's language-model tasks have no head.
    """
    out: dict[str, int | None] = {}
    for name, p in method.named_parameters():
        if p.requires_grad:
            out[f"method.{name}"] = method.param_layer(name)
    for name, p in head.named_parameters() if head is not None else ():
        if p.requires_grad:
            out[f"head.{name}"] = None
    return out


def layer_lr_scale(layer: int | None, num_layers: int, decay: float) -> float:
    """``decay ** (distance from the top layer)``: top layer and head 1, embeddings decay^L."""
    if layer is None or decay == 1.0:
        return 1.0
    distance = num_layers if layer < 0 else num_layers - 1 - layer
    return decay ** max(distance, 0)


def param_groups(
    named: dict[str, nn.Parameter],
    layers: dict[str, int | None],
    base_lr: float,
    weight_decay: float,
    layer_decay: float,
    num_layers: int,
) -> list[dict[str, Any]]:
    """AdamW groups: one per (lr scale, decay / no decay), in a stable order.

    Groups carry ``layer`` (the deepest layer key) and ``names`` for inspection; torch keeps
    extra keys in ``param_groups`` and in its state dict.
    """
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, p in named.items():
        layer = layers[name]
        scale = layer_lr_scale(layer, num_layers, layer_decay)
        no_decay = _no_decay(name, p)
        g = groups.setdefault(
            (scale, no_decay),
            {
                "params": [],
                "names": [],
                "lr": base_lr * scale,
                "weight_decay": 0.0 if no_decay else weight_decay,
            },
        )
        g["params"].append(p)
        g["names"].append(name)
    # Highest lr first, then decayed before not decayed: deterministic optimizer layout.
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], k[1]))]


def unfreeze_epoch(layer: int | None, num_layers: int, layers_per_epoch: int) -> int:
    """First epoch in which a parameter of ``layer`` trains under gradual unfreezing.

    Epoch 0 trains the top (head, None) only; each later epoch adds the next
    ``layers_per_epoch`` encoder layers downwards; the embeddings come one epoch after layer 0.
    ``layers_per_epoch == 0`` means no gradual unfreezing: everything trains from epoch 0.
    """
    if layers_per_epoch <= 0 or layer is None:
        return 0
    k = layers_per_epoch
    if layer < 0:
        return 1 + math.ceil(num_layers / k)
    return 1 + (num_layers - 1 - layer) // k


def unfrozen(
    layers: dict[str, int | None], epoch: int, num_layers: int, layers_per_epoch: int
) -> set[str]:
    """Names of the parameters that train in ``epoch``."""
    return {
        n
        for n, layer in layers.items()
        if unfreeze_epoch(layer, num_layers, layers_per_epoch) <= epoch
    }

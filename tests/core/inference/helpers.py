"""Test helpers: random non-trivial adapters and one-row-at-a-time reference outputs."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from torch import Tensor

from core.adapter import Adapter
from core.base import FrozenBase
from core.heads import Head, HeadConfig
from core.inference import tokens as tokens_module
from core.methods import build_method, parse_method_config
from core.model import AdaptedModel

LABELS = {
    2: ["neg", "pos"],
    3: ["neg", "neutral", "pos"],
    5: ["one", "two", "three", "four", "five"],
}


def head_config(n_labels: int | None) -> HeadConfig:
    """``None`` → a reward head; otherwise classification with ``n_labels`` labels."""
    if n_labels is None:
        return HeadConfig(task="reward", text_pair=True)
    return HeadConfig(task="classification", label_names=LABELS[n_labels])


def random_adapter(
    base: FrozenBase,
    method: str,
    params: dict[str, Any] | None = None,
    n_labels: int | None = 2,
    seed: int = 0,
    noise: float = 0.3,
) -> Adapter:
    """An adapter whose every trainable tensor is perturbed (LoRA's B is not left at zero)."""
    torch.manual_seed(seed)
    cfg = parse_method_config(method, params or {})
    m = build_method(cfg, base)
    head = Head(head_config(n_labels), base.hidden_size).to(base.device)
    scale = 0.02 if method in ("full", "scratch") else noise  # keep full models sane
    with torch.no_grad():
        for p in [*m.parameters(), *head.parameters()]:
            p.add_(torch.randn_like(p) * scale)
    return Adapter.from_model(AdaptedModel(base, m, head), 0, {})


def lora(base: FrozenBase, r: int, targets: Any = ("query", "value"), **kw: Any) -> Adapter:
    n_labels = kw.pop("n_labels", 2)
    seed = kw.pop("seed", r)
    params = {
        "r": r,
        "alpha": 2.0 * r,
        "target_modules": list(targets) if not isinstance(targets, str) else targets,
        **kw,
    }
    return random_adapter(base, "lora", params, n_labels=n_labels, seed=seed)


def reference(
    base: FrozenBase, adapter: Adapter | None, text: str, pair: str | None = None
) -> Tensor:
    """One row alone through ``adapter.build(base)`` (or the bare base): logits/reward/features."""
    reserved = 0 if adapter is None else adapter.method.reserved_positions
    batch = base.tokenize(
        [text], [pair] if pair is not None else None, max_length=base.max_length - reserved
    )
    with torch.inference_mode():
        if adapter is None:
            return base.embed(batch)[0]
        model = adapter.build(base)
        return model(batch).reshape(-1)


def output(result: Any) -> Tensor:
    """The numeric output of a :class:`RowResult` as a tensor."""
    assert result.ok, result.error
    if result.features is not None and result.task is None:
        return torch.tensor(result.features)
    if result.task == "reward":
        return torch.tensor([result.reward])
    return torch.tensor(result.logits)


def spy_tokenizer(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record (thread name, longest string handed over) of every tokenizer call from now on."""
    calls: list[tuple[str, int]] = []
    real = tokens_module.encode_batch

    def spy(tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int) -> Any:
        calls.append((threading.current_thread().name, max(map(len, [*texts, *(pairs or [])]))))
        return real(tokenizer, texts, pairs, max_length)

    monkeypatch.setattr(tokens_module, "encode_batch", spy)
    return calls

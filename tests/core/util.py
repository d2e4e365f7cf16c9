"""Small helpers shared by the core tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from core.base import FrozenBase
from core.encoder import EncoderHooks
from core.heads import Head, HeadConfig
from core.methods import build_method, parse_method_config
from core.methods.method import AdapterMethod
from core.model import AdaptedModel

TEXTS = ["the movie was great", "a terrible , boring film that i hate", "fun"]
CLASSIFY = HeadConfig(task="classification", label_names=["neg", "pos"])


def make_method(base: FrozenBase, method_type: str, **params: object) -> AdapterMethod:
    return build_method(parse_method_config(method_type, dict(params)), base)


def make_model(base: FrozenBase, method_type: str, **params: object) -> AdaptedModel:
    method = make_method(base, method_type, **params)
    return AdaptedModel(base, method, Head(CLASSIFY, base.hidden_size).to(base.device))


def batch(base: FrozenBase, max_length: int | None = None) -> dict[str, Tensor]:
    return base.tokenize(TEXTS, max_length=max_length)


def hidden(
    method: AdapterMethod, inputs: dict[str, Tensor], hooks: EncoderHooks | None = None
) -> Tensor:
    """Last hidden states of the real tokens with ``method`` applied (no dropout)."""
    with torch.no_grad():
        out, _ = method.encoder()(
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs.get("token_type_ids"),
            hooks=hooks if hooks is not None else method.hooks(),
        )
    return out


def randomize(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """Add noise to every trainable tensor so a trained-looking adapter differs from the base
    (LoRA B and adapter up-projections start at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p) * std)


def checksum(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def write_files(files: dict[str, bytes], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def read_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

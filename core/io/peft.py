"""PEFT interop: export our LoRA / prompt-tuning adapters as PEFT folders and import PEFT's.

A PEFT adapter is a folder of two files, ``adapter_config.json`` and
``adapter_model.safetensors``; both directions work on ``{file name: bytes}`` so the service
can take uploads and serve downloads without touching disk. Our head (PEFT has no place for
it) travels in ``loraplex_head.safetensors``, which PEFT ignores, with its config under a
``loraplex`` key in ``adapter_config.json`` (PEFT warns about that unknown key and ignores it).

Only safetensors and JSON are read: pickle files (``adapter_model.bin``) are refused.
Methods without a PEFT equivalent (bottleneck adapters, full, scratch, feature extraction)
cannot be exported, nor can prompt tuning on a decoder (:func:`peft_export_refusal`).
Prompt-tuning details: see :mod:`core.io.peft_prompt`.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import Tensor

from core.adapter import Adapter, base_kind_of
from core.base import FrozenBase
from core.decoder.base import DecoderBase
from core.decoder.forward import forward, logits
from core.errors import AdapterFormatError
from core.heads import LANGUAGE_MODEL_TASKS, Head, HeadConfig
from core.io.peft_lora import export_lora, import_lora
from core.io.peft_prompt import export_prompt, import_prompt
from core.io.serialization import tensors_from_bytes, tensors_to_bytes
from core.methods import MethodConfig
from core.methods.lora import LoraConfig
from core.methods.prompt_tuning import PromptTuningConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
HEAD_FILE = "loraplex_head.safetensors"
EXTRA_KEY = "loraplex"
EXTRA_FORMAT = "loraplex.peft/1"
# torch.save / pickle based files: loading them can execute code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def peft_export_refusal(method_type: str, base: FrozenBase | DecoderBase) -> str | None:
    """Why an adapter of ``method_type`` on ``base`` has no PEFT folder; None where it has one:
    LoRA on either kind of base, prompt tuning on an encoder (its layout,
    :mod:`core.io.peft_prompt`, is mapped for an encoder's embeddings only)."""
    if method_type == "lora" or (method_type == "prompt_tuning" and isinstance(base, FrozenBase)):
        return None
    if method_type == "prompt_tuning":
        return "prompt tuning on a decoder base has no PEFT export"
    return f"method {method_type!r} has no PEFT equivalent (PEFT has lora and prompt_tuning)"


def export_peft(adapter: Adapter, base: FrozenBase | DecoderBase) -> dict[str, bytes]:
    """``{file name: bytes}`` of a PEFT adapter folder (plus our head file)."""
    adapter.check_base(base)
    method = adapter.method
    refusal = peft_export_refusal(method.type, base)
    if refusal is not None:
        raise AdapterFormatError(refusal)
    if isinstance(method, LoraConfig):
        config, tensors = export_lora(method, adapter.method_state, base)
    else:
        assert isinstance(method, PromptTuningConfig) and isinstance(base, FrozenBase)
        config, tensors = export_prompt(method, adapter.method_state, base)
    config["base_model_name_or_path"] = base.name
    config[EXTRA_KEY] = {
        "format": EXTRA_FORMAT,
        "method": method.to_dict(),
        "head": adapter.head.model_dump(mode="json"),
        "head_file": HEAD_FILE,
        "base_name": adapter.base_name,
        "base_fingerprint": adapter.base_fingerprint,
    }
    return {
        CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True).encode(),
        WEIGHTS_FILE: tensors_to_bytes(tensors),
        HEAD_FILE: tensors_to_bytes(adapter.head_state),
    }


def import_peft(
    files: dict[str, bytes], base: FrozenBase | DecoderBase, head: HeadConfig | None = None
) -> Adapter:
    """An :class:`Adapter` for ``base`` from a PEFT folder's files (LoRA or prompt tuning; on
    a decoder base, a ``CAUSAL_LM`` LoRA).

    ``head``: the head to attach. None takes our head from a loraplex export; a PEFT adapter
    from elsewhere has none, so an encoder's needs a head config (the head starts untrained),
    and a decoder's is a ``chat`` adapter (the base's own language-model head) unless a head
    config says otherwise. A given head equal to the exported one keeps its trained weights.
    """
    by_name = _by_file_name(files)
    if CONFIG_FILE not in by_name:
        raise AdapterFormatError(f"{CONFIG_FILE} is missing")
    if WEIGHTS_FILE not in by_name:
        raise AdapterFormatError(f"{WEIGHTS_FILE} is missing")
    cfg = _parse_config(by_name[CONFIG_FILE])
    extra = cfg.get(EXTRA_KEY) if isinstance(cfg.get(EXTRA_KEY), dict) else {}
    _check_base(cfg, extra, base)
    tensors = tensors_from_bytes(by_name[WEIGHTS_FILE])

    peft_type = cfg.get("peft_type")
    method: MethodConfig
    if peft_type == "LORA":
        method, state = import_lora(cfg, tensors, base)
    elif peft_type == "PROMPT_TUNING" and isinstance(base, FrozenBase):
        ours = extra.get("method")
        method, state = import_prompt(cfg, tensors, base, ours if isinstance(ours, dict) else None)
    else:
        supported = "'LORA', 'PROMPT_TUNING'" if isinstance(base, FrozenBase) else "'LORA'"
        raise AdapterFormatError(
            f"unsupported peft_type {peft_type!r} on a {base_kind_of(base)} base; "
            f"supported: {supported}"
        )
    if head is None and isinstance(base, DecoderBase) and extra.get("head") is None:
        head = HeadConfig(task="chat")  # a causal LM's adapter: the base's own head
    head_cfg, head_state = _resolve_head(head, extra, by_name.get(HEAD_FILE), base)
    adapter = Adapter(
        method=method,
        head=head_cfg,
        method_state={k: v.float().contiguous() for k, v in state.items()},
        head_state=head_state,
        base_name=base.name,
        base_fingerprint=base.fingerprint,
        trainable_params=sum(t.numel() for t in (*state.values(), *head_state.values())),
        metrics={"imported_from": "peft"},
    )
    check_servable(adapter, base)
    return adapter


def check_window(adapter: Adapter, base: FrozenBase | DecoderBase) -> None:
    """Refuse a head trained at more tokens per input than ``base`` takes with the adapter's
    method (its limit less the method's reserved positions, as training caps it): serving
    encodes at the head's length, and every input past the base's positions would fail."""
    wanted = adapter.head.max_seq_length
    reserved = adapter.method.reserved_positions
    limit = base.max_length - reserved
    if wanted is not None and wanted > limit:
        less = f" ({base.max_length} less the method's {reserved} positions)" if reserved else ""
        raise AdapterFormatError(
            f"head.max_seq_length: {wanted} is more than the base's {limit}-token window{less}"
        )


def check_servable(adapter: Adapter, base: FrozenBase | DecoderBase) -> None:
    """Refuse an imported adapter that cannot serve on ``base``: a trained length past its
    window (:func:`check_window`), weights or outputs that are not finite numbers.

    A NaN in the weights, or a scaling such as ``lora_alpha=1e308``, loads without complaint
    and then makes every prediction fail; an import is the place to say so. The weights are
    checked by name; one forward pass catches what only overflows once combined.
    """
    check_window(adapter, base)
    for where, tensors in (("weights", adapter.method_state), ("head", adapter.head_state)):
        for key, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise AdapterFormatError(f"{where} tensor {key!r} holds NaN or infinite values")
    # The weights must also load into the method as built here.
    with torch.inference_mode():
        if isinstance(base, FrozenBase):
            out = adapter.build(base)(base.tokenize(["a probe sentence"]))
        else:
            out = _decoder_probe(adapter, base)
    if not bool(torch.isfinite(out).all()):
        raise AdapterFormatError(
            f"the adapter's outputs on base {base.name!r} are not finite numbers: its scaling "
            f"({adapter.method.to_dict()}) or weights are too large"
        )


# Tokens in the decoder probe row: as many as a short sentence.
PROBE_TOKENS = 8


def _decoder_probe(adapter: Adapter, base: DecoderBase) -> Tensor:
    """The adapter's output on a decoder base for one probe row: logits, or its head's.

    The row is fixed token ids spread over the vocabulary, not a tokenized text: the base's
    tokenizer is shared by the request threads under GenerationServer's lock, and an
    import (a request thread of its own) would use it unlocked; a fast tokenizer is not safe
    from two threads at once."""
    vocab = base.config.vocab_size
    ids = torch.arange(PROBE_TOKENS, device=base.device).mul_(vocab // PROBE_TOKENS)[None]
    mask = torch.ones_like(ids)
    if adapter.head.task in LANGUAGE_MODEL_TASKS:
        method = adapter.load_method(base)
        weights = getattr(method, "decoder_weights", lambda: base.weights)()
        hidden = forward(weights, ids, mask, hooks=method.hooks())
        return logits(weights, hidden)
    return adapter.build_decoder_head(base)({"input_ids": ids, "attention_mask": mask})


def _by_file_name(files: dict[str, bytes]) -> dict[str, bytes]:
    """Files keyed by base name (uploads may carry folder paths); pickle files are refused."""
    out: dict[str, bytes] = {}
    for name, data in files.items():
        base_name = PurePosixPath(name.replace("\\", "/")).name
        if base_name.lower().endswith(PICKLE_SUFFIXES):
            raise AdapterFormatError(
                f"{base_name!r} is a pickle file, which is refused (loading it can run code); "
                "save the adapter with safetensors (PEFT's default, safe_serialization=True)"
            )
        out[base_name] = data
    return out


def _parse_config(data: bytes) -> dict[str, Any]:
    try:
        cfg = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{CONFIG_FILE} must hold a JSON object")
    try:
        # JSON's "\ud800" escape parses to a lone surrogate, which a tokenizer (prompt
        # tuning's init_text) and every UTF-8 store refuse with an exception of their own.
        json.dumps(cfg, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise AdapterFormatError(
            f"{CONFIG_FILE} holds text that is not valid Unicode (a lone surrogate)"
        ) from None
    return cfg


def _tail(name: str) -> str:
    return name.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", "\\")) or (len(name) > 1 and name[1] == ":")


def _base_paths(base: FrozenBase | DecoderBase) -> tuple[Path, ...]:
    """The local paths a PEFT config may record for ``base``: its folder or file, and for a
    GGUF file the folder it sits in (transformers loads one as ``from_pretrained(folder,
    gguf_file=...)`` and records the folder; PEFT keeps only that, as SmolLM2's wheel shows)."""
    path = base.path.resolve()
    return (path, path.parent) if path.is_file() else (path,)


def _check_base(cfg: dict[str, Any], extra: dict[str, Any], base: FrozenBase | DecoderBase) -> None:
    """Refuse adapters that say they belong to another base; shapes are checked later."""
    fingerprint = extra.get("base_fingerprint")
    if fingerprint and fingerprint != base.fingerprint:
        raise AdapterFormatError(
            f"adapter was exported from base {extra.get('base_name')!r} with other weights "
            f"(fingerprint {str(fingerprint)[:12]}), not from the loaded {base.name!r}"
        )
    name = cfg.get("base_model_name_or_path")
    if not name or not isinstance(name, str):
        return
    if _looks_like_path(name):
        # A local path: the same folder is a match; a path we cannot see proves nothing (nor
        # one this system cannot even look up: an unknown ~user, a NUL byte, a name too long).
        try:
            path = Path(name).expanduser()
            if not path.exists() or path.resolve() in _base_paths(base):
                return
        except (RuntimeError, ValueError, OSError):
            return
    if _tail(name) == _tail(base.name):
        return
    raise AdapterFormatError(
        f"adapter was trained on base model {name!r}, not on the loaded {base.name!r}"
    )


def _resolve_head(
    head: HeadConfig | None,
    extra: dict[str, Any],
    head_file: bytes | None,
    base: FrozenBase | DecoderBase,
) -> tuple[HeadConfig, dict[str, Tensor]]:
    saved_cfg: HeadConfig | None = None
    if extra.get("head") is not None:
        try:
            saved_cfg = HeadConfig(**extra["head"])
        except (TypeError, ValueError) as e:
            raise AdapterFormatError(f"invalid head config under {EXTRA_KEY!r}: {e}") from None
    if head is None:
        if saved_cfg is None or head_file is None:
            raise AdapterFormatError(
                "this PEFT adapter has no loraplex head; pass a head config (task and labels)"
            )
        head = saved_cfg
    if head.task in LANGUAGE_MODEL_TASKS:
        state: dict[str, Tensor] = {}  # the base's own language-model head
    elif head == saved_cfg and head_file is not None:
        state = tensors_from_bytes(head_file)
    else:
        # A new, untrained head (train it, e.g. with feature extraction on the imported base).
        state = {k: v.detach().cpu() for k, v in Head(head, base.hidden_size).state_dict().items()}
    return head, state

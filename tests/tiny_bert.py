"""A tiny randomly initialised BERT folder (Hugging Face layout) for fast tests."""

from __future__ import annotations

import json
import string
from pathlib import Path

TINY_NAME = "loraplex-tests/tiny-bert"
_WORDS = (  # noqa: SIM905 - a word list reads best as one string
    "the a an and or not is was were this that it movie film story actor plot good great bad "
    "terrible awful fine boring fun love hate very really so too of to in on for with"
).split()


def tiny_vocab() -> list[str]:
    """Special tokens, some words, and every lowercase letter and digit (also as ``##``
    continuations) so the WordPiece tokenizer never needs [UNK] for plain ASCII words."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = [f"##{c}" for c in string.ascii_lowercase + string.digits]
    return list(dict.fromkeys(specials + _WORDS + chars + pieces))  # unique, order kept


def build_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """Write config.json, model.safetensors, vocab.txt, tokenizer files and a mean-pooling
    ``1_Pooling/config.json`` (like MiniLM) into ``folder``: hidden 32, 2 layers, 4 heads,
    intermediate 64, 64 positions. Load it with ``load_base_model(folder, name=TINY_NAME)``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
    )
    torch.manual_seed(seed)
    model = BertModel(config)
    # HF init leaves LayerNorms at exactly (1, 0) and biases at 0; perturb them so tests
    # exercise every weight (a bug that ignores a bias would otherwise go unnoticed).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    return folder

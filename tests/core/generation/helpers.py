"""Random LoRA adapters for the decoder, a scheduler factory, and event collection."""

from __future__ import annotations

import torch

from core.decoder.base import DecoderBase
from core.generation.adapters import LoraWeights
from core.generation.sampling import SamplingParams
from core.generation.scheduler import GenerationRequest, Scheduler, SequenceEvent
from core.targets import DECODER_TARGET_MODULES, module_path


def random_lora(
    base: DecoderBase,
    key: str,
    r: int,
    targets: tuple[str, ...] = DECODER_TARGET_MODULES,
    layers: list[int] | None = None,
    seed: int = 0,
    std: float = 0.1,
) -> LoraWeights:
    """A LoRA adapter with non-zero random A and B (a trained adapter's B is not zero)."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for layer in layers if layers is not None else range(base.num_layers):
        for target in targets:
            n_in, n_out = base.config.linear_shape(target)
            a = torch.randn(r, n_in, generator=g) * std
            b = torch.randn(n_out, r, generator=g) * std
            pairs[(layer, target)] = (a, b)
    return LoraWeights(key, pairs, scaling=2.0)


def merged(base: DecoderBase, adapter: LoraWeights | None) -> dict[str, torch.Tensor]:
    """The base's state dict with ``W + scaling · B @ A`` at the adapter's sites."""
    state = dict(base.state_dict)
    if adapter is None:
        return state
    for (layer, target), (a, b) in adapter.pairs.items():
        name = f"{module_path(layer, target)}.weight"
        state[name] = state[name] + adapter.scaling * (b @ a)
    return state


def scheduler(
    base: DecoderBase,
    num_slots: int = 8,
    capacity: int = 128,
    max_waiting: int = 64,
    reserved_slots: int = 0,
    max_adapters: int = 8,
    stop_token_ids: tuple[int, ...] | None = None,
    prefill_tokens_per_step: int = 2048,
    merged_bytes: int = 512 << 20,
    prefix_cache_bytes: int = 0,
) -> Scheduler:
    return Scheduler(
        base.weights,
        base.tokenizer,
        num_slots=num_slots,
        capacity=capacity,
        stop_token_ids=base.stop_token_ids if stop_token_ids is None else stop_token_ids,
        max_waiting=max_waiting,
        reserved_slots=reserved_slots,
        max_adapters=max_adapters,
        prefill_tokens_per_step=prefill_tokens_per_step,
        merged_bytes=merged_bytes,
        prefix_cache_bytes=prefix_cache_bytes,
    )


def chat_prompts(base: DecoderBase, *questions: str) -> list[list[int]]:
    """Each question as a user's one message through the base's chat template."""
    template = base.tokenizer.apply_chat_template
    return [
        list(template([{"role": "user", "content": q}], add_generation_prompt=True))
        for q in questions
    ]


def greedy(max_tokens: int, n: int = 1, stop: tuple[str, ...] = ()) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, n=n, stop=stop)


class Outputs:
    """Events gathered per (request, candidate)."""

    def __init__(self) -> None:
        self.tokens: dict[tuple[int, int], list[int]] = {}
        self.text: dict[tuple[int, int], str] = {}
        self.finish: dict[tuple[int, int], str] = {}
        self.events: list[SequenceEvent] = []

    def take(self, events: list[SequenceEvent]) -> None:
        for e in events:
            assert e.error is None, e.error
            key = (e.request_id, e.index)
            self.tokens.setdefault(key, []).extend(e.token_ids)
            self.text[key] = self.text.get(key, "") + e.text
            if e.finish_reason is not None:
                self.finish[key] = e.finish_reason
            self.events.append(e)


def run_all(sched: Scheduler, requests: list[GenerationRequest]) -> tuple[list[int], Outputs]:
    """Add every request, step until all are done; the request ids and their outputs."""
    ids = [sched.add(r) for r in requests]
    out = Outputs()
    while sched.running or sched.waiting:
        out.take(sched.step())
    return ids, out

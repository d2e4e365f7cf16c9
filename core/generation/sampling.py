"""Choosing each sequence's next token: greedy, temperature, top-p, seeds and logprobs.

Every sequence samples with its own :class:`torch.Generator`, so a seeded request draws the
same random numbers whatever else shares its decode step: same seed + same request, same text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from core.errors import ConfigError

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates; validated on construction (errors name the field)."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # candidate j of a seeded request samples with seed + j
    n: int = 1  # candidates generated from one prefill
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives reported per token (with ``logprobs``)
    stop: tuple[str, ...] = ()  # strings that end a candidate (not included in its text)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError("max_tokens", "must be at least 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError("temperature", "must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p", "must be greater than 0 and at most 1")
        if not 1 <= self.n <= MAX_N:
            raise ConfigError("n", f"must be between 1 and {MAX_N}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ConfigError("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}")
        if self.top_logprobs and not self.logprobs:
            raise ConfigError("top_logprobs", "needs logprobs to be true")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ConfigError("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ConfigError("stop", f"each stop string needs 1 to {MAX_STOP_CHARS} characters")

    def generator(self, candidate: int, device: torch.device) -> torch.Generator:
        """Candidate ``candidate``'s own random stream."""
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed + candidate)
        return g


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability under the model, and the ``top`` alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


def sample(
    logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Next token per row of ``logits`` ``[B, vocab]``, and its logprob where asked for.

    Reported logprobs are the model's own distribution (before temperature and top-p), as
    OpenAI's are.
    """
    logits = logits.float()
    chosen = logits.argmax(-1)  # greedy rows keep this
    for i, p in enumerate(params):
        if p.temperature == 0.0:
            continue
        # Shifted so the best logit is 0 before dividing: a tiny temperature then sends the
        # others to -inf rather than every logit to ±inf, whose softmax is NaN (1e-40 failed
        # the request, and every other one sharing its step, in torch.multinomial). The floor
        # keeps a temperature that is 0 in float32 (5e-324) from dividing 0 by 0.
        scaled = (logits[i] - logits[i].max()) / max(p.temperature, _TINY)
        probs = torch.softmax(scaled, dim=-1)
        if p.top_p < 1.0:
            probs = _top_p(probs, p.top_p)
        chosen[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    tokens: list[int] = chosen.tolist()
    want = [i for i, p in enumerate(params) if p.logprobs]
    out: list[TokenLogprob | None] = [None] * len(params)
    if want:
        rows = torch.tensor(want, device=logits.device)
        logp = torch.log_softmax(logits.index_select(0, rows), dim=-1)
        k = max(params[i].top_logprobs for i in want)
        top_v, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        picked = logp.gather(1, chosen.index_select(0, rows)[:, None])[:, 0].tolist()
        top_v_l, top_i_l = top_v.tolist(), top_i.tolist()
        for j, i in enumerate(want):
            n = params[i].top_logprobs
            top = list(zip(top_i_l[j][:n], top_v_l[j][:n], strict=True))
            out[i] = TokenLogprob(tokens[i], picked[j], top)
    return tokens, out


def _top_p(probs: Tensor, top_p: float) -> Tensor:
    """``probs`` kept on the smallest set of most likely tokens whose mass reaches ``top_p``."""
    sorted_p, order = probs.sort(descending=True)
    # A token stays if the mass before it is still short of top_p. The best one always stays,
    # set apart: its mass before is 0, and a top_p under float32's least (1e-46) is 0 there
    # too, which kept nothing and failed every request of the step in torch.multinomial.
    keep = (sorted_p.cumsum(0) - sorted_p) < top_p
    keep[0] = True
    kept = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return kept / kept.sum()

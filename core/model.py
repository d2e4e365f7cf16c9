"""An adapted model: the shared frozen base + one method + one head, for training and eval."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.base import FrozenBase
from core.encoder import EncoderHooks, pool
from core.heads import Head
from core.methods.method import AdapterMethod


def response_mask(token_type_ids: Tensor | None, attention_mask: Tensor) -> Tensor:
    """The response's tokens of each row: token type 1 of a (prompt, response) pair, or every
    token of a row that is a response alone."""
    if token_type_ids is None:
        return attention_mask
    response = token_type_ids * attention_mask
    return torch.where(response.sum(1, keepdim=True) > 0, response, attention_mask)


def pool_rows(
    hidden: Tensor,
    attention_mask: Tensor,
    token_type_ids: Tensor | None,
    mode: str,
    response_rows: Tensor,
) -> Tensor:
    """Features of each row: the base's pooling (``mode``), or where ``response_rows`` [B] is
    true the mean over the row's response (a reward head with ``pooling="response"``)."""
    if not bool(response_rows.any()):
        return pool(hidden, attention_mask, mode)
    response = pool(hidden, response_mask(token_type_ids, attention_mask), "mean")
    if bool(response_rows.all()):
        return response
    return torch.where(response_rows[:, None], response, pool(hidden, attention_mask, mode))


class AdaptedModel(nn.Module):
    def __init__(self, base: FrozenBase, method: AdapterMethod, head: Head) -> None:
        super().__init__()
        self._base = [base]  # not a submodule: its weights are shared and frozen
        self.method = method
        self.head = head

    @property
    def base(self) -> FrozenBase:
        return self._base[0]

    def features(
        self, batch: dict[str, Tensor], dropout: bool = False, hooks: EncoderHooks | None = None
    ) -> Tensor:
        """Pooled features of the adapted encoder (``hooks`` overrides, e.g. merged LoRA)."""
        encoder = self.method.encoder()
        hidden, mask = encoder(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("token_type_ids"),
            hooks=hooks if hooks is not None else self.method.hooks(dropout),
            dropout=dropout,
        )
        response = self.head.config.pooling == "response"
        rows = torch.full((hidden.shape[0],), response, dtype=torch.bool, device=hidden.device)
        return pool_rows(hidden, mask, batch.get("token_type_ids"), self.base.pooling, rows)

    def forward(self, batch: dict[str, Tensor], dropout: bool = False) -> Tensor:
        """Logits ``[B, n_labels]`` for classification, rewards ``[B]`` for reward heads."""
        return self.head(self.features(batch, dropout), dropout)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def trainable_parameter_count(model: AdaptedModel) -> tuple[int, float]:
    """``(count, fraction)``: parameters the optimizer updates (method + head) and their share
    of the frozen base's parameter count (full fine-tuning is a little above 1.0)."""
    count = model.num_trainable()
    return count, count / model.base.num_params

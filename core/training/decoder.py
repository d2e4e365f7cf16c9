"""The Trainer's recipe on a decoder base: chat SFT (task ``chat``) and DPO (task ``dpo``).

Usage, as for the encoder's tasks (:mod:`core.training.trainer`)::

    trainer = DecoderTrainer(decoder_base, {"type": "lora"}, {"task": "chat"}, rows, val_rows,
                             config, callbacks)
    result = trainer.train()   # result.adapter: LoRA weights recording the decoder base
    trainer = DecoderTrainer.resume(checkpoint_bytes, decoder_base, rows, val_rows)

Everything but the task's parts is the encoder's recipe, unchanged: warm-up and schedules,
layer-wise learning-rate decay, clipping, seeds and RNG scopes, early stopping, bucketing by
length, forwards in chunks, checkpoints and bit-exact resume. What differs:

- rows are OpenAI chat or DPO rows (:mod:`core.training.decoder_data`) rendered with the
  base's chat template; the loss is on the trained assistant tokens only;
- there is no head: the base's own language-model head predicts the tokens, and the adapter's
  ``HeadConfig`` records the task only;
- DPO's reference policy is the same frozen base with the adapter's hooks off, so it costs a
  forward without gradients per step, never a second copy of the model; or, for SFT then DPO,
  a ``reference_adapter`` of the same base, from whose weights the policy starts;
- LoRA, full fine-tuning (a trainable copy of every weight, which the decoder's forward runs
  instead of the base's) and prompt tuning (virtual token embeddings the decoder's forward
  puts before every row, as PEFT does) are the methods.

Metrics. A chat run's validation has ``loss`` and ``accuracy`` (token accuracy over every
target of the validation set) like the encoder's tasks, so ``metric_for_best`` reads them
alike; its steps report ``train_mean_token_accuracy``; :func:`openai_chat_metrics` names a
progress event's numbers as OpenAI's fine-tuning events do. A DPO run reports TRL
``DPOTrainer``'s ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies`` and
``rewards/margins`` per step and at validation (where ``accuracy`` is ``rewards/accuracies``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from core.adapter import Adapter
from core.decoder.base import DecoderBase
from core.decoder.forward import DecoderWeights, forward
from core.decoder.losses import DpoLoss, dpo_loss, reply_logprobs, sft_loss, targets
from core.errors import AdapterFormatError, ConfigError
from core.heads import HeadConfig
from core.methods import MethodConfig, build_method
from core.methods.full.model import DecoderFullModel
from core.methods.method import AdapterMethod
from core.methods.prompt_tuning.model import DecoderPromptTuningModel
from core.targets import DECODER_METHODS, BaseKind
from core.training.callbacks import ProgressEvent, TrainerCallbacks
from core.training.config import TrainingConfig, hold_out_required
from core.training.data import eval_batches, forward_chunks, split_validation
from core.training.decoder_data import (
    DECODER_TASKS,
    DecoderData,
    coerce_decoder_examples,
    encode_decoder,
)
from core.training.trainer import Trainer

# Padded tokens per forward (and backward) of a decoder step. A LoRA chat step on SmolLM2-135M
# in fp32 holds about 4.5 MiB of activations a token for the backward (30 layers): at 8 rows x
# 256 tokens the process peaked at 2.0 GiB in forwards of one row (0.9 GiB of it the loaded
# base), 5.6 GiB in forwards of 4 rows and 7.6 GiB in one forward, transformers + PEFT's one
# forward at 8.7 GiB, with step times within noise of each other (python -m
# bench.decoder_train --memory 512 2048 8192 --batch 8 --tokens 256, 2 shared cores). 256
# tokens keep a step near 1.2 GiB above the base for rows up to 256 tokens; a longer row still
# runs whole (one row is the smallest part).
DECODER_FORWARD_TOKENS = 256
# TRL DPOTrainer's metric names.
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


class DecoderTrainer(Trainer):
    """Fine-tunes a LoRA adapter of a frozen shared decoder base on chat or DPO rows.

    ``head_config``: ``{"task": "chat"}`` or ``{"task": "dpo"}`` (or that ``HeadConfig``).
    Rows are OpenAI chat rows (``chat``) or OpenAI DPO rows (``dpo``); ``val_examples`` None:
    a seeded ``validation_fraction`` of the training rows is held out.
    """

    base_kind: ClassVar[BaseKind] = "decoder"
    base: DecoderBase  # type: ignore[assignment]
    train_data: DecoderData  # type: ignore[assignment]
    val_data: DecoderData | None  # type: ignore[assignment]

    def __init__(
        self,
        base: DecoderBase,
        method_config: MethodConfig | Mapping[str, Any],
        head_config: HeadConfig | Mapping[str, Any],
        train_examples: Sequence[Any],
        val_examples: Sequence[Any] | None = None,
        config: TrainingConfig | Mapping[str, Any] | None = None,
        callbacks: TrainerCallbacks | None = None,
        *,
        reference_adapter: Adapter | None = None,
    ) -> None:
        """``reference_adapter`` (DPO only): an adapter of this base, usually an SFT one, that
        is DPO's reference instead of the bare base, and the policy's starting weights (as
        TRL's ``ref_adapter_name``); the method config must be its own."""
        super().__init__(
            base,  # type: ignore[arg-type]
            method_config,
            head_config,
            train_examples,
            val_examples,
            config,
            callbacks,
        )
        self.reference_adapter = reference_adapter

    # --- the task's parts ---------------------------------------------------------------------

    def _prepare_data(self) -> None:
        cfg = self.config
        self.head_config = _task_config(self._head_config_in)
        if self.method_config.type not in DECODER_METHODS:
            raise ConfigError(
                "type",
                f"{self.method_config.type!r} does not train a decoder base yet; use one of "
                f"{list(DECODER_METHODS)}",
            )
        if cfg.unfreeze_layers_per_epoch:
            raise ConfigError("gradual_unfreezing", "a decoder's tasks have no head to start with")
        if cfg.metric_for_best == "macro_f1":
            raise ConfigError("metric_for_best", "macro_f1 is a classification metric")
        task = self.head_config.task
        train = coerce_decoder_examples(self._train_rows, task, "training")
        val_rows = self._val_rows
        val = coerce_decoder_examples(val_rows, task, "validation") if val_rows else None
        self.held_out_examples = 0
        if val is None and cfg.validation_fraction > 0:
            train, held = split_validation(
                train, cfg.validation_fraction, cfg.seed, hold_out_required(cfg)
            )
            self.held_out_examples, val = len(held), held or None
        self.split_rows = 0
        self.max_length = self._row_length(task)
        tok, template = self.base.tokenizer, self.base.chat_template
        self.train_data = encode_decoder(train, tok, template, self.max_length, "training")
        self.val_data = (
            encode_decoder(val, tok, template, self.max_length, "validation") if val else None
        )

    def _build_model(self) -> None:
        self.method = build_method(self.method_config, self.base)
        self.frozen_features = False
        self.reference: AdapterMethod | None = None
        ref = self.reference_adapter
        if ref is None:
            return
        if self.head_config.task != "dpo":
            raise ConfigError("reference_adapter", "only DPO has a reference policy")
        try:
            self.reference = ref.load_method(self.base)
        except AdapterFormatError as e:
            raise ConfigError("reference_adapter", str(e)) from None
        if ref.method != self.method_config:
            raise ConfigError(
                "reference_adapter",
                "the policy starts from the reference adapter's weights, so the method config "
                f"must be its own: {ref.method.to_dict()}",
            )
        device = self.base.device
        self.method.load_saved_state({k: v.to(device) for k, v in ref.method_state.items()})

    def _reference_logprobs(self, ids: Tensor, attention: Tensor, mask: Tensor) -> Tensor:
        """DPO's reference: the base with the adapter off, or the reference adapter."""
        ref = self.reference
        if ref is None:
            return reply_logprobs(self.base.weights, ids, attention, mask)
        if isinstance(ref, DecoderFullModel):
            return reply_logprobs(ref.decoder_weights(), ids, attention, mask)
        return reply_logprobs(self.base.weights, ids, attention, mask, ref.hooks(), _prefix(ref))

    def _identity(self) -> dict[str, Any]:
        ref = self.reference_adapter
        return {**super()._identity(), "reference_adapter": _state_digest(ref) if ref else None}

    def _policy_weights(self) -> DecoderWeights:
        """The weights the adapted model runs: full fine-tuning's copy, else the base's (which
        LoRA's hooks adapt, and which are DPO's reference either way)."""
        if isinstance(self.method, DecoderFullModel):
            return self.method.decoder_weights()
        return self.base.weights

    def _trainable_modules(self) -> dict[str, nn.Module]:
        return {"method": self.method}

    def _base_tensors(self) -> Iterable[Tensor]:
        return self.base.state_dict.values()

    def _step_parts(self, idx: list[int]) -> list[list[int]]:
        return forward_chunks(self.train_data, idx, DECODER_FORWARD_TOKENS)

    def _part_loss(self, part: list[int], idx: list[int]) -> tuple[Tensor, dict[str, float]]:
        w = self._policy_weights()
        ids, attention, mask = self.train_data.collate(part, self.base.device)
        hooks, prefix = self.method.hooks(dropout=True), _prefix(self.method)
        if self.head_config.task == "chat":
            # The loss is a mean over the batch's target tokens: a part weighs its share.
            n_batch = self.train_data.target_count(idx)
            hidden = forward(w, ids, attention, hooks=hooks, prefix=prefix)
            t = targets(w, hidden, ids, mask)
            loss = sft_loss(t) * (t.tokens.numel() / n_batch)
            correct = int((t.logits.detach().argmax(-1) == t.tokens).sum())
            return loss, {"train_mean_token_accuracy": correct / n_batch}
        policy = reply_logprobs(w, ids, attention, mask, hooks, prefix)
        with torch.no_grad():
            reference = self._reference_logprobs(ids, attention, mask)
        out = self._dpo(policy, reference)
        share = len(part) / len(idx)  # the loss is a mean over the batch's pairs
        return out.loss * share, {k: v * share for k, v in _dpo_metrics(out).items()}

    def _dpo(self, policy: Tensor, reference: Tensor) -> DpoLoss:
        """The DPO loss of a ``[chosen..., rejected...]`` batch's log-probabilities."""
        n = policy.shape[0] // 2
        cfg = self.config
        return dpo_loss(
            policy[:n], policy[n:], reference[:n], reference[n:], cfg.beta, cfg.label_smoothing
        )

    def evaluate(self) -> dict[str, Any]:
        """Validation metrics of the current weights over the whole validation set."""
        assert self.val_data is not None
        data, device, w = self.val_data, self.base.device, self._policy_weights()
        sums: dict[str, float] = {}
        count = 0
        for idx in eval_batches(data.lengths, self.config.resolved_eval_batch_size()):
            for part in forward_chunks(data, idx, DECODER_FORWARD_TOKENS):
                self._check_cancel()
                ids, attention, mask = data.collate(part, device)
                with torch.inference_mode():
                    prefix = _prefix(self.method)
                    if self.head_config.task == "chat":
                        hidden = forward(
                            w, ids, attention, hooks=self.method.hooks(), prefix=prefix
                        )
                        t = targets(w, hidden, ids, mask)
                        n = t.tokens.numel()
                        part_sums = {
                            "loss": float(sft_loss(t)) * n,
                            "accuracy": float((t.logits.argmax(-1) == t.tokens).sum()),
                        }
                    else:
                        hooks = self.method.hooks()
                        policy = reply_logprobs(w, ids, attention, mask, hooks, prefix)
                        out = self._dpo(policy, self._reference_logprobs(ids, attention, mask))
                        n = len(part)
                        part_sums = {"loss": float(out.loss) * n}
                        part_sums.update({k: v * n for k, v in _dpo_metrics(out).items()})
                count += n
                for k, v in part_sums.items():
                    sums[k] = sums.get(k, 0.0) + v
        metrics: dict[str, Any] = {k: v / max(count, 1) for k, v in sums.items()}
        if self.head_config.task == "dpo":
            metrics["accuracy"] = metrics["rewards/accuracies"]
            metrics["pairs"] = count
        else:
            metrics["tokens"] = count
        return metrics

    def _served_head(self) -> HeadConfig:
        return self.head_config  # a chat or DPO adapter's head records its task alone

    def _make_adapter(self, metrics: dict[str, Any]) -> Adapter:
        return Adapter.from_method(self.method, self._served_head(), self.trainable_params, metrics)

    def close(self) -> None:
        self.reference = None  # a full fine-tuning reference is a whole copy of the model
        super().close()


def _prefix(method: AdapterMethod) -> Tensor | None:
    """Prompt tuning's virtual token embeddings (``DecoderPromptTuningModel.prefix``)."""
    return method.prefix() if isinstance(method, DecoderPromptTuningModel) else None


def _state_digest(adapter: Adapter) -> str:
    """sha256 of an adapter's method tensors: a checkpoint resumes only on its reference."""
    h = hashlib.sha256()
    for name in sorted(adapter.method_state):
        h.update(name.encode())
        h.update(adapter.method_state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _task_config(head: HeadConfig | Mapping[str, Any]) -> HeadConfig:
    if not isinstance(head, HeadConfig):
        try:
            head = HeadConfig(**dict(head))
        except ValidationError as e:
            err = e.errors()[0]
            raise ConfigError(str(err["loc"][0]) if err["loc"] else "task", err["msg"]) from None
        except TypeError as e:
            raise ConfigError("task", str(e)) from None
    if head.task not in DECODER_TASKS:
        raise ConfigError("task", f"a decoder base trains {list(DECODER_TASKS)}, not {head.task!r}")
    return head


def _dpo_metrics(out: DpoLoss) -> dict[str, float]:
    """Means over the pairs of ``out``, under TRL's names.
    A tie counts as wrong, as in the reward models' accuracy."""
    chosen, rejected = out.chosen_rewards, out.rejected_rewards
    return {
        "rewards/chosen": float(chosen.mean()),
        "rewards/rejected": float(rejected.mean()),
        "rewards/accuracies": float((chosen > rejected).float().mean()),
        "rewards/margins": float((chosen - rejected).mean()),
    }


def openai_chat_metrics(event: ProgressEvent) -> dict[str, float]:
    """A chat run's progress event as OpenAI's fine-tuning metrics event names its numbers.

    ``train_loss`` is the step's loss (OpenAI's, not the epoch's running mean). Every
    validation here scores the whole validation set, so ``valid_*`` and ``full_valid_*`` are
    the same numbers; both are given because OpenAI clients read either.
    """
    out = {"step": float(event.step), "train_loss": event.step_loss}
    if "train_mean_token_accuracy" in event.step_metrics:
        out["train_mean_token_accuracy"] = event.step_metrics["train_mean_token_accuracy"]
    if event.val_metrics is not None:
        for prefix in ("valid", "full_valid"):
            out[f"{prefix}_loss"] = event.val_metrics["loss"]
            out[f"{prefix}_mean_token_accuracy"] = event.val_metrics["accuracy"]
    return out

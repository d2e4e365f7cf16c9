"""The training recipe: one object, explicit ``setup`` / ``train`` / ``save_checkpoint``.

Usage (what the service worker does)::

    trainer = Trainer(base, method_config, head_config, train_rows, val_rows, config, callbacks)
    trainer.setup()            # validates data (DataError names the row), builds everything
    result = trainer.train()   # -> TrainResult(adapter, metrics, best_step, history)

    # after a crash, from the last bytes handed to callbacks.on_checkpoint:
    trainer = Trainer.resume(checkpoint_bytes, base, train_rows, val_rows, callbacks=callbacks)
    result = trainer.train()

The recipe reads top to bottom: ``setup`` builds the run, ``train`` loops over steps with the
bookkeeping after each (validation, best weights, callbacks, checkpoints), ``save_checkpoint``
/ ``resume`` stop and restart it. The ideas it uses live beside it, one module each:
:mod:`~core.training.inputs` (configs and rows from the caller, checked),
:mod:`~core.training.state` (what changes while training, and how a checkpoint saves it),
:mod:`~core.training.rng` (the run's own randomness, which makes resume bit-exact),
:mod:`~core.training.averaging` (a reward model's result: the mean of its epochs' weights),
:mod:`~core.training.checkpoint` (the bytes) and :mod:`~core.training.callbacks` (what the
caller is told).

A decoder base's tasks (chat SFT and DPO) run this same recipe through
:class:`core.training.decoder.DecoderTrainer`, which overrides the task's parts only (the
methods under "the task's parts": data, model, trainable modules, a step's loss, evaluation,
the adapter).

Why this module is past the project's ~400 lines: it is one recipe. Setup, the step loop and
its bookkeeping, evaluation and checkpoint/resume all act on the same run objects (model,
optimizer, scheduler, state), and a reader follows one step through them in order; what does
not need those objects is in the modules above.

Threads: ``torch.set_num_threads`` is process-wide, so this module never calls it; the worker
process sets it once (``TrainingConfig.num_threads`` is advisory, for that caller).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from core.adapter import Adapter
from core.base import FrozenBase
from core.errors import Cancelled, ConfigError
from core.heads import Head, HeadConfig
from core.methods import MethodConfig, build_method
from core.model import AdaptedModel
from core.targets import BaseKind
from core.training import checkpoint as ckpt
from core.training.averaging import EpochAverage
from core.training.callbacks import ProgressEvent, TrainerCallbacks, TrainResult
from core.training.config import TrainingConfig, parse_training_config, settings_unread_by
from core.training.data import (
    BucketSampler,
    EncodedData,
    Example,
    encode,
    eval_batches,
    forward_chunks,
)
from core.training.inputs import method_config_of, prepare_inputs
from core.training.metrics import (
    ClassificationMetrics,
    RewardMetrics,
    classification_loss,
    reward_loss,
)
from core.training.rng import TrainerRng, forked_rng
from core.training.schedules import lr_lambda, param_groups, param_layers, unfrozen
from core.training.state import TrainingState

# Callers import the run's events, callbacks and result from here, with the Trainer.
__all__ = ["ProgressEvent", "TrainResult", "Trainer", "TrainerCallbacks"]

# Config fields that do not change the training trajectory: they may differ on resume.
_RESUME_FREE_FIELDS = {"checkpoint_every_steps", "num_threads"}


class Trainer:
    """Fine-tunes one adapter (method + head) on a frozen shared base.

    ``method_config``: a ``MethodConfig`` or ``{"type": ..., **params}``. ``head_config``: a
    ``HeadConfig``, or a mapping from which missing ``label_names`` (sorted distinct training
    labels) and ``text_pair`` (whether rows carry a second text) are filled in from the data.
    Rows are example objects or dicts (``text``/``label``/``text_pair`` or
    ``prompt``/``chosen``/``rejected``/``margin``). ``val_examples`` None (or empty): a
    seeded, stratified ``validation_fraction`` of the training rows is held out.
    """

    # The kind of base this trainer's tasks run on (method configs are validated for it).
    base_kind: ClassVar[BaseKind] = "encoder"

    def __init__(
        self,
        base: FrozenBase,
        method_config: MethodConfig | Mapping[str, Any],
        head_config: HeadConfig | Mapping[str, Any],
        train_examples: Sequence[Example | Mapping[str, Any]],
        val_examples: Sequence[Example | Mapping[str, Any]] | None = None,
        config: TrainingConfig | Mapping[str, Any] | None = None,
        callbacks: TrainerCallbacks | None = None,
    ) -> None:
        self.base = base
        self.method_config = method_config_of(method_config, self.base_kind)
        self._head_config_in = head_config
        self.config = parse_training_config(dict(config) if isinstance(config, Mapping) else config)
        self.callbacks = callbacks or TrainerCallbacks()
        self._train_rows = train_examples
        self._val_rows = val_examples or None
        self._ready = False
        self._closed = False
        self.state = TrainingState()

    # --- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        """Validate and tokenize the data, build model, optimizer, scheduler and sampler."""
        if self._closed:
            raise RuntimeError("trainer was closed (cancelled or finished); resume a checkpoint")
        cfg = self.config
        self._prepare_data()
        self.method_config = self.method_config.for_task(self.head_config.task)
        # Dropout while training; a reward model trains without it by default (disable_dropout).
        self.dropout = not (self.head_config.task == "reward" and cfg.disable_dropout)
        # Seeded initialisation inside a forked RNG: same seed, same initial weights, whatever
        # else the process did before, and the global RNG is left as it was.
        with forked_rng(self.base.device):
            torch.manual_seed(cfg.seed)
            self._build_model()
        modules = self._trainable_modules()
        self.named_params: dict[str, nn.Parameter] = {}
        for prefix, module in modules.items():
            module.requires_grad_(True)
            for n, p in module.named_parameters():
                self.named_params[f"{prefix}.{n}"] = p
        _check_base_untouched(self._base_tensors(), self.named_params)
        self.layers = {
            k: v
            for k, v in param_layers(self.method, modules.get("head")).items()
            if k in self.named_params
        }
        self.trainable_params = sum(p.numel() for p in self.named_params.values())

        self.lr = cfg.resolved_learning_rate(self.method_config.type)
        groups = param_groups(
            self.named_params,
            self.layers,
            self.lr,
            cfg.weight_decay,
            cfg.layerwise_lr_decay,
            self.base.num_layers,
        )
        self.optimizer = torch.optim.AdamW(
            groups, lr=self.lr, betas=cfg.adam_betas, eps=cfg.adam_epsilon
        )
        lengths = self.train_data.lengths
        self.sampler = BucketSampler(
            lengths,
            cfg.batch_size,
            cfg.seed,
            # Cached features have no length: bucketing would only make batches less random.
            cfg.bucket_by_length and not self.frozen_features,
        )
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = cfg.total_steps(len(lengths))
        self.warmup_steps = cfg.resolved_warmup_steps(self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler, self.warmup_steps, self.total_steps)
        )
        self._rng = TrainerRng.seeded(cfg.seed, self.base.device)
        self._train_feats: Tensor | None = None
        self._val_feats: Tensor | None = None
        self._best_state: dict[str, Tensor] | None = None
        # A reward model's result is the mean of its epoch ends (average_epochs), not the
        # best of them, so no best weights are kept.
        averaging = self.head_config.task == "reward" and cfg.average_epochs
        self._average = EpochAverage() if averaging else None
        self.state = TrainingState()
        self._ready = True

    # --- the task's parts (a decoder's trainer overrides these) -------------------------------

    def _row_length(self, task: str) -> int:
        """Tokens per row of ``task``: its ``max_seq_length`` within the base's window, less
        the positions prompt tuning's virtual tokens take (real text gets what is left)."""
        reserved = int(getattr(self.method_config, "reserved_positions", 0))
        wanted = self.config.resolved_max_seq_length(task)
        return min(wanted, self.base.max_length - reserved)

    def _prepare_data(self) -> None:
        """Check and tokenize the rows: sets ``head_config``, ``held_out_examples``,
        ``split_rows``, ``max_length``, ``train_data`` and ``val_data``."""
        cfg = self.config
        inputs = prepare_inputs(self._head_config_in, self._train_rows, self._val_rows, cfg)
        if inputs.head.base_kind != "encoder":
            raise ConfigError("pooling", "an encoder's head reads 'base' or 'response' pooling")
        self.head_config = inputs.head
        # Rows of the training set held out for validation (none when a set was given).
        self.held_out_examples = inputs.held_out
        self.split_rows = inputs.split_rows

        self.max_length = self._row_length(self.head_config.task)
        tok, labels = self.base.tokenizer, self.head_config.label_names
        self.train_data = encode(inputs.train, tok, self.max_length, labels, cfg.margin)
        self.val_data = (
            encode(inputs.val, tok, self.max_length, labels, cfg.margin) if inputs.val else None
        )

    def _build_model(self) -> None:
        """The method's fresh weights (under the run's seed): sets ``method``, ``model`` and
        ``frozen_features``."""
        self.method = build_method(self.method_config, self.base)
        head = Head(self.head_config, self.base.hidden_size).to(self.base.device)
        self.model = AdaptedModel(self.base, self.method, head)
        self.frozen_features = bool(getattr(self.method, "frozen_features", False))

    def _trainable_modules(self) -> dict[str, nn.Module]:
        """What the optimizer trains and a checkpoint saves, by name prefix. Everything a
        method owns is trainable (AdapterMethod holds only trainable state); feature
        extraction trains the head alone."""
        if self.frozen_features:
            return {"head": self.model.head}
        # Method first: the optimizer's parameter order, which its saved state indexes.
        return {"method": self.method, "head": self.model.head}

    def _base_tensors(self) -> Iterable[Tensor]:
        """The shared base's weights, which nothing here may train."""
        return self.base.encoder.parameters()

    # --- what the run resolved ----------------------------------------------------------------

    @property
    def epochs_done(self) -> float:
        """Epochs completed so far, as a float (HF Trainer's ``epoch``): 1.0 after the first."""
        return self.state.epoch + self.state.batch_in_epoch / self.steps_per_epoch

    def resolved_hyperparameters(self) -> dict[str, Any]:
        """Every training setting as this run uses it (set up first), with the data split.

        "auto" and unset values are replaced by what they resolved to (learning rate, warm-up
        steps, evaluation batch size, the sequence length after the base model's cap), and the
        plan is added: steps, epochs, and how many rows train and validate. ``validation``
        says where validation rows come from: ``"validation_set"`` (given), ``"held_out"``
        (``held_out_examples`` training rows, a ``validation_fraction`` share) or ``"none"``.
        """
        if not self._ready:
            raise RuntimeError("resolved_hyperparameters() needs a set-up trainer")
        cfg = self.config
        out = cfg.to_dict()
        out.pop("num_threads")  # advisory for the caller, not used here
        if self.val_data is None:
            validation = "none"
        else:
            validation = "held_out" if self.held_out_examples else "validation_set"
        out.update(
            {
                "learning_rate": self.lr,
                "warmup_steps": self.warmup_steps,
                "eval_batch_size": cfg.resolved_eval_batch_size(),
                "max_seq_length": self.max_length,
                # Epochs the steps reach into (max_steps may end one part-way).
                "n_epochs": math.ceil(self.total_steps / self.steps_per_epoch),
                "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch,
                "validation": validation,
                "validation_fraction": cfg.validation_fraction if self.held_out_examples else 0.0,
                "held_out_examples": self.held_out_examples,
                "train_examples": len(self.train_data),
                "val_examples": len(self.val_data) if self.val_data is not None else 0,
            }
        )
        return out

    def pair_report(self) -> dict[str, int] | None:
        """Preference data only (None otherwise): ``split_rows``, rows whose shared dialogue
        became their prompt, and ``identical_pairs``, pairs (training and validation) whose
        chosen and rejected are the same input after tokenization and truncation: they teach
        nothing and are scored as ties."""
        if not self._ready:
            raise RuntimeError("pair_report() needs a set-up trainer")
        if self.head_config.task != "reward":
            return None
        identical = self.train_data.identical_pairs()
        if self.val_data is not None:
            identical += self.val_data.identical_pairs()
        return {"split_rows": self.split_rows, "identical_pairs": identical}

    # --- training ----------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Run to the end (or early stop); restore the best weights (a reward model's: the mean
        of its epochs', ``average_epochs``); return the adapter.

        Raises :class:`Cancelled` within one step of ``should_cancel`` returning True; the
        trainer then drops its model, optimizer and data so their memory can be freed.
        """
        if not self._ready:
            self.setup()
        try:
            return self._train()
        except BaseException:
            self.close()
            raise

    def _train(self) -> TrainResult:
        st = self.state
        t0 = time.monotonic() - st.elapsed
        if self.frozen_features and self._train_feats is None:
            self._train_feats = self._cache_features(self.train_data)
            if self.val_data is not None:
                self._val_feats = self._cache_features(self.val_data)
        if st.pending is not None and self._after_step(t0):  # resumed mid-bookkeeping
            return self._finish()
        while st.step < self.total_steps and not st.stopped_early:
            epoch = st.epoch
            self._apply_unfreezing(epoch)
            batches = self.sampler.batches(epoch)
            for bi in range(st.batch_in_epoch, len(batches)):
                self._check_cancel()
                lr = self.optimizer.param_groups[0]["lr"]
                loss, step_metrics = self._train_step(batches[bi])
                st.step += 1
                st.trained_tokens += self.train_data.token_count(batches[bi])
                st.loss_sum += loss
                st.loss_count += 1
                end_of_epoch = bi + 1 == len(batches)
                if end_of_epoch and self._average is not None:
                    self._average.add(self.named_params, st.step)
                # Position is normalised before anything is saved: (epoch, next batch).
                if end_of_epoch:
                    st.epoch, st.batch_in_epoch = epoch + 1, 0
                else:
                    st.batch_in_epoch = bi + 1
                train_loss = st.loss_sum / st.loss_count
                if end_of_epoch:
                    st.loss_sum, st.loss_count = 0.0, 0
                st.pending = {
                    "epoch": self.epochs_done,
                    "end_of_epoch": end_of_epoch,
                    "train_loss": train_loss,
                    "lr": lr,
                    "loss": loss,
                    "metrics": step_metrics,
                }
                if self._after_step(t0):
                    break
        return self._finish()

    def _after_step(self, t0: float) -> bool:
        """Validation, callbacks and checkpoint after a step; True when training is over."""
        cfg, st = self.config, self.state
        assert st.pending is not None
        epoch, end_of_epoch = st.pending["epoch"], st.pending["end_of_epoch"]
        train_loss, lr = st.pending["train_loss"], st.pending["lr"]
        done = st.step >= self.total_steps
        every = cfg.eval_every_steps
        eval_due = (every and st.step % every == 0) or (end_of_epoch and not every) or done
        val = self._evaluate_and_track(epoch, train_loss, lr, t0) if eval_due else None
        loss = st.pending["loss"]
        # Checkpoints written before steps had metrics lack them.
        step_metrics = st.pending.get("metrics", {})
        st.pending = None
        st.elapsed = time.monotonic() - t0
        event = ProgressEvent(
            st.step,
            self.total_steps,
            epoch,
            train_loss,
            lr,
            val,
            st.elapsed,
            loss,
            st.trained_tokens,
            step_metrics,
        )
        if self.callbacks.on_progress:
            self.callbacks.on_progress(event)
        if val is not None and self.callbacks.on_eval:
            self.callbacks.on_eval(event)
        finished = done or st.stopped_early
        every_ck = cfg.checkpoint_every_steps
        ckpt_due = end_of_epoch or (every_ck and st.step % every_ck == 0)
        if ckpt_due and not finished and self.callbacks.on_checkpoint:
            metrics = {"train_loss": train_loss, **(st.last_val or {})}
            self.callbacks.on_checkpoint(self.save_checkpoint(), st.step, epoch, metrics)
        return finished

    def _train_step(self, idx: list[int]) -> tuple[float, dict[str, float]]:
        """One optimizer step on the batch ``idx``: its loss and the task's step metrics."""
        step_loss = 0.0
        step_metrics: dict[str, float] = {}
        with self._rng.scope():
            self.optimizer.zero_grad(set_to_none=True)
            for part in self._step_parts(idx):
                loss, shares = self._part_loss(part, idx)
                loss.backward()
                step_loss += float(loss.detach())
                for k, v in shares.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + v
            if self.config.max_grad_norm:
                params = [p for p in self.named_params.values() if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
        return step_loss, step_metrics

    def _step_parts(self, idx: list[int]) -> list[list[int]]:
        """The forwards a batch runs in, each freeing its activations before the next."""
        return [idx] if self.frozen_features else forward_chunks(self.train_data, idx)

    def _part_loss(self, part: list[int], idx: list[int]) -> tuple[Tensor, dict[str, float]]:
        """The loss of ``part``'s rows weighted by their share of the batch ``idx`` (so the
        parts' gradients add up to the batch's), and the parts' shares of the step metrics
        (none for heads: the running loss is their training metric)."""
        data, device = self.train_data, self.base.device
        if self.frozen_features:
            assert self._train_feats is not None
            out = self.model.head(_flatten_pairs(self._train_feats[part]), dropout=self.dropout)
        else:
            out = self.model(data.collate(part, device), dropout=self.dropout)
        # The loss is a mean over the batch's rows.
        return self._loss(out, data.targets(part, device)) * (len(part) / len(idx)), {}

    def _loss(self, out: Tensor, targets: Tensor) -> Tensor:
        if self.head_config.task == "classification":
            return classification_loss(out, targets)
        n = targets.shape[0]
        return reward_loss(out[:n], out[n:], targets, self.config.center_rewards_coefficient)

    def _apply_unfreezing(self, epoch: int) -> None:
        k = self.config.unfreeze_layers_per_epoch
        if not k:
            return
        live = unfrozen(self.layers, epoch, self.base.num_layers, k)
        for name, p in self.named_params.items():
            p.requires_grad_(name in live)

    # --- evaluation --------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Validation metrics of the current weights (no dropout, no gradients)."""
        assert self.val_data is not None
        data = self.val_data
        task = self.head_config.task
        acc: ClassificationMetrics | RewardMetrics
        if task == "classification":
            acc = ClassificationMetrics(self.head_config.label_names)
        else:
            acc = RewardMetrics(self.config.center_rewards_coefficient)
        bs = self.config.resolved_eval_batch_size()
        batches = eval_batches(data.lengths, bs)
        if self._val_feats is None:  # one forward's activations at a time, as in training
            batches = [part for idx in batches for part in forward_chunks(data, idx)]
        for idx in batches:
            self._check_cancel()
            with torch.inference_mode():
                if self._val_feats is not None:
                    out = self.model.head(_flatten_pairs(self._val_feats[idx]))
                else:
                    out = self.model(data.collate(idx, self.base.device))
                targets = data.targets(idx, self.base.device)
            if isinstance(acc, ClassificationMetrics):
                acc.update(out, targets)
            else:
                n = targets.shape[0]
                acc.update(out[:n], out[n:], targets)
        return acc.compute()

    def _evaluate_and_track(
        self, epoch: float, train_loss: float, lr: float, t0: float
    ) -> dict[str, Any] | None:
        """Validate (if the run has validation data), keep the best weights, log the point."""
        st, cfg = self.state, self.config
        val = None
        if self.val_data is None:
            st.best_step = st.step  # without validation the last weights are the result
        else:
            val = self.evaluate()
            best = st.track_validation(val, cfg.metric_for_best, cfg.early_stopping_patience)
            if best and self._average is None:
                self._best_state = self._snapshot()
        st.record(epoch, train_loss, lr, val, time.monotonic() - t0)
        return val

    def _cache_features(self, data: EncodedData) -> Tensor:
        """Pooled base features of every example, computed once (feature extraction)."""
        n_seq = len(data.ids[0])
        feats = torch.empty(len(data), n_seq, self.base.hidden_size, device=self.base.device)
        for idx in eval_batches(data.lengths, self.config.resolved_eval_batch_size()):
            self._check_cancel()
            with torch.inference_mode():
                f = self.model.features(data.collate(idx, self.base.device))
            # Copied out of inference mode so the head can be trained on these tensors.
            with torch.no_grad():
                feats[idx] = f.view(n_seq, len(idx), -1).transpose(0, 1).clone()
        return feats

    # --- result ------------------------------------------------------------------------------

    def _finish(self) -> TrainResult:
        st = self.state
        if self._average is not None:
            result_step, val = st.step, self._load_average()
        else:
            if self._best_state is not None and st.best_step != st.step:
                self._load_trainable_state(self._best_state)
            result_step, val = st.best_step, st.best_metrics
        last_train = next(
            (h["train_loss"] for h in reversed(st.history) if h["step"] == result_step), None
        )
        metrics: dict[str, Any] = {f"val_{k}": v for k, v in val.items()}
        if self._average is not None:
            metrics["averaged_epochs"] = self._average.count
        metrics.update(
            {
                "train_loss": last_train,
                "best_step": result_step,
                "steps": st.step,
                "epochs": self.epochs_done,
                "trained_tokens": st.trained_tokens,
                "stopped_early": st.stopped_early,
                "train_examples": len(self.train_data),
                "val_examples": len(self.val_data) if self.val_data is not None else 0,
            }
        )
        adapter = self._make_adapter(metrics)
        result = TrainResult(
            adapter=adapter,
            metrics=metrics,
            best_step=result_step,
            history=list(st.history),
            stopped_early=st.stopped_early,
            steps=st.step,
        )
        self.close()
        return result

    def _load_average(self) -> dict[str, Any]:
        """Set the weights to the mean of the epoch ends (and of the last step, when a run
        stops within an epoch); return the mean's validation metrics (none without data)."""
        average, st = self._average, self.state
        assert average is not None
        if average.step != st.step:
            average.add(self.named_params, st.step)
        if average.count == 1:  # the mean of one is the last weights, validated already
            return st.last_val or {}
        with torch.no_grad():
            for name, weight in average.mean().items():
                self.named_params[name].copy_(weight)
        return self.evaluate() if self.val_data is not None else {}

    def _served_head(self) -> HeadConfig:
        """The head config the adapter is saved with. It records how rows were encoded, so
        serving encodes them alike; the trainer's own head_config stays as given (checkpoints
        are identified by it)."""
        return self.head_config.model_copy(
            update={
                "max_seq_length": self.max_length,
                "split_shared_prefix": self.head_config.task == "reward"
                and self.config.split_shared_prefix,
            }
        )

    def _make_adapter(self, metrics: dict[str, Any]) -> Adapter:
        return Adapter.from_method(
            self.model.method,
            self._served_head(),
            self.trainable_params,
            metrics,
            self.model.head.state_dict(),
        )

    def close(self) -> None:
        """Drop model, optimizer, cached data and features so their memory can be freed.

        Called by ``train()`` when it returns or raises; the trainer cannot be used after.
        """
        for name in (
            "model",
            "method",
            "optimizer",
            "scheduler",
            "_best_state",
            "_average",
            "_train_feats",
            "_val_feats",
            "train_data",
            "val_data",
            "named_params",
        ):
            if hasattr(self, name):
                setattr(self, name, None)
        self._ready = False
        self._closed = True

    # --- checkpoints -------------------------------------------------------------------------

    def _trainable_state(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for prefix, module in self._trainable_modules().items():
            out.update(ckpt.prefixed(f"{prefix}.", module.state_dict()))
        return out

    def _snapshot(self) -> dict[str, Tensor]:
        """A copy of the trainable weights, that later steps do not change."""
        return {k: v.detach().clone() for k, v in self._trainable_state().items()}

    def _load_trainable_state(self, state: Mapping[str, Tensor]) -> None:
        for prefix, module in self._trainable_modules().items():
            module.load_state_dict(ckpt.unprefixed(f"{prefix}.", state), strict=True)

    def _identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed here."""
        train_cfg = {k: v for k, v in self.config.to_dict().items() if k not in _RESUME_FREE_FIELDS}
        return {
            "base_fingerprint": self.base.fingerprint,
            "method": self.method_config.to_dict(),
            "head": self.head_config.model_dump(mode="json"),
            "training": train_cfg,
            "train_data": self.train_data.fingerprint(),
            "val_data": self.val_data.fingerprint() if self.val_data is not None else None,
        }

    def _settings_read(self, training: Mapping[str, Any]) -> dict[str, Any]:
        """The training settings this run's task reads, of a checkpoint's ``training``: a
        setting added since for another task (``average_epochs``) does not stop a resume."""
        unread = settings_unread_by(self.head_config.task)
        return {k: v for k, v in training.items() if k not in unread}

    def save_checkpoint(self) -> bytes:
        """The full training state as bytes (JSON + safetensors; never pickle)."""
        if not self._ready:
            raise RuntimeError("save_checkpoint() needs a set-up trainer")
        st = self.state
        tensors = ckpt.prefixed("model.", self._trainable_state())
        optim_meta, optim_tensors = ckpt.optimizer_to_parts(self.optimizer.state_dict())
        tensors.update(optim_tensors)
        # Best weights other than the current ones; has_best says whether there are any.
        if self._best_state is not None and st.best_step != st.step:
            tensors.update(ckpt.prefixed("best.", self._best_state))
        average = self._average
        if average is not None and average.total is not None:
            tensors.update(ckpt.prefixed("average.", average.total))
        saved = st.to_json()
        meta = {
            "format": ckpt.FORMAT,
            "identity": self._identity(),
            "config": self.config.to_dict(),
            "position": saved["position"],
            "total_steps": self.total_steps,
            "rng": self._rng.to_json(),
            "optimizer": optim_meta,
            "scheduler": ckpt.scheduler_to_json(self.scheduler),
            "state": {**saved["state"], "has_best": self._best_state is not None},
            "average": None if average is None else {"epochs": average.count, "step": average.step},
            # What the adapter of these weights records besides the method and base in
            # ``identity``: ckpt.adapter_from_checkpoint serves a checkpoint as that adapter.
            "adapter": {
                "head": self._served_head().model_dump(mode="json"),
                "base_name": self.base.name,
                "trainable_params": self.trainable_params,
            },
        }
        return ckpt.pack(meta, tensors)

    def load_checkpoint(self, data: bytes) -> None:
        """Restore a state saved by :meth:`save_checkpoint` of the same job (set up first)."""
        if not self._ready:
            self.setup()
        meta, tensors = ckpt.unpack(data)
        mine = self._identity()
        theirs = meta.get("identity", {})
        for key, value in mine.items():
            saved = theirs.get(key)
            if key == "training" and isinstance(saved, dict):
                value, saved = self._settings_read(value), self._settings_read(saved)
            if saved != value:
                raise ckpt.CheckpointError(f"checkpoint belongs to a different job: {key} differs")
        device = self.base.device
        try:
            model_state = ckpt.unprefixed("model.", tensors)
            self._load_trainable_state({k: v.to(device) for k, v in model_state.items()})
            self.optimizer.load_state_dict(ckpt.optimizer_from_parts(meta["optimizer"], tensors))
            self.scheduler.load_state_dict(ckpt.scheduler_from_json(meta["scheduler"]))
            self._rng = TrainerRng.from_json(meta["rng"], device)
            self.state = TrainingState.from_json(meta)
            if self._average is not None:
                total = {k: v.to(device) for k, v in ckpt.unprefixed("average.", tensors).items()}
                self._average = EpochAverage(
                    total or None, meta["average"]["epochs"], meta["average"]["step"]
                )
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"checkpoint does not fit this job: {e}") from None
        best = {k: v.to(device) for k, v in ckpt.unprefixed("best.", tensors).items()}
        if best:
            self._best_state = best
        elif meta["state"].get("has_best"):  # best == the weights at the checkpoint's step
            self._best_state = self._snapshot()
        if self.state.step > self.total_steps:
            raise ckpt.CheckpointError("checkpoint is past the end of this job")

    @classmethod
    def resume(
        cls,
        checkpoint: bytes,
        base: FrozenBase,
        train_examples: Sequence[Example | Mapping[str, Any]],
        val_examples: Sequence[Example | Mapping[str, Any]] | None = None,
        *,
        method_config: MethodConfig | Mapping[str, Any] | None = None,
        head_config: HeadConfig | Mapping[str, Any] | None = None,
        config: TrainingConfig | Mapping[str, Any] | None = None,
        callbacks: TrainerCallbacks | None = None,
        **task_options: Any,
    ) -> Trainer:
        """A set-up trainer positioned at ``checkpoint``; configs default to the saved ones.

        The same training rows (and validation rows, if any were given) must be passed: the
        checkpoint records fingerprints of the tokenized data and refuses other data.
        ``task_options`` go to the constructor of a trainer that takes more than these (a
        ``DecoderTrainer``'s ``reference_adapter``).
        """
        meta = ckpt.read_meta(checkpoint)
        ident = meta.get("identity", {})
        try:
            trainer = cls(
                base,
                method_config if method_config is not None else ident["method"],
                head_config if head_config is not None else ident["head"],
                train_examples,
                val_examples,
                config if config is not None else meta["config"],
                callbacks,
                **task_options,
            )
        except KeyError as e:
            raise ckpt.CheckpointError(f"checkpoint metadata lacks {e}") from None
        trainer.setup()
        trainer.load_checkpoint(checkpoint)
        return trainer

    # --- helpers -----------------------------------------------------------------------------

    def _check_cancel(self) -> None:
        if self.callbacks.should_cancel is not None and self.callbacks.should_cancel():
            self.close()
            raise Cancelled("training cancelled")


# --------------------------------------------------------------------------------------------
# Module helpers
# --------------------------------------------------------------------------------------------


def _check_base_untouched(base: Iterable[Tensor], named: Mapping[str, nn.Parameter]) -> None:
    """Invariant: the shared base is never trained. A method must own a copy to train it."""
    base_ids = {id(p) for p in base}
    shared = [n for n, p in named.items() if id(p) in base_ids]
    if shared:
        raise RuntimeError(f"method exposes shared base weights as trainable: {shared[:3]}")


def _flatten_pairs(feats: Tensor) -> Tensor:
    """``[B, k, H]`` cached features → ``[k*B, H]`` in collate's order (all chosen first)."""
    return feats.transpose(0, 1).reshape(-1, feats.shape[-1])

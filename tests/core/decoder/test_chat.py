"""Chat rows to ids and loss masks; the SFT and DPO losses."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from core.decoder.base import DecoderBase
from core.decoder.chat import collate, render_chat, render_reply
from core.decoder.forward import forward
from core.decoder.losses import (
    dpo_loss,
    reply_logprobs,
    sft_loss,
    targets,
    token_accuracy,
)
from core.errors import DataError
from core.methods.lora.layer import LoraHooks
from core.training.decoder_data import coerce_decoder_examples, encode_decoder

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def target_text(base: DecoderBase, ids: list[int], mask: list[int]) -> str:
    return base.tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])


def render(base: DecoderBase, messages: list[dict[str, Any]], max_len: int = 256) -> Any:
    return render_chat(base.tokenizer, base.chat_template, messages, max_len)


def test_only_assistant_turns_are_targets(tiny_decoder: DecoderBase) -> None:
    row = render(tiny_decoder, CHAT)
    assert target_text(tiny_decoder, row.input_ids, row.loss_mask) == (
        "Hello!<|im_end|>Paris.<|im_end|>"
    )
    # The whole rendering is the template's, token for token.
    assert row.input_ids == tiny_decoder.tokenizer.apply_chat_template(CHAT)
    unweighted = [*CHAT[:2], {**CHAT[2], "weight": 0}, *CHAT[3:]]
    row = render(tiny_decoder, unweighted)
    assert target_text(tiny_decoder, row.input_ids, row.loss_mask) == "Paris.<|im_end|>"
    with pytest.raises(DataError, match="no assistant message"):
        render(tiny_decoder, [*CHAT[:2], {**CHAT[2], "weight": 0}])
    with pytest.raises(DataError, match="message 1"):
        render(tiny_decoder, [CHAT[0], {"role": "tool", "content": "x"}, CHAT[2]])
    # A learnt assistant turn first has no prompt to render (the template raised IndexError).
    with pytest.raises(DataError, match="needs a message before it"):
        render(tiny_decoder, [{"role": "assistant", "content": "Hi."}, *CHAT[1:3]])


def test_user_and_system_tokens_get_no_gradient(tiny_decoder: DecoderBase) -> None:
    rows = [render(tiny_decoder, CHAT), render(tiny_decoder, CHAT[1:3])]
    ids, attention, loss_mask = collate(rows)
    hidden = forward(tiny_decoder.weights, ids, attention).detach().requires_grad_(True)
    sft_loss(targets(tiny_decoder.weights, hidden, ids, loss_mask)).backward()
    assert hidden.grad is not None
    # Position t is trained on token t + 1: its gradient is non-zero exactly when t + 1 is a
    # target, i.e. an assistant token. The last position predicts nothing.
    predicts_target = torch.zeros_like(loss_mask, dtype=torch.bool)
    predicts_target[:, :-1] = loss_mask[:, 1:].bool()
    grad_norm = hidden.grad.norm(dim=-1)
    assert torch.all(grad_norm[~predicts_target] == 0)
    assert torch.all(grad_norm[predicts_target] > 0)


def test_sft_loss_equals_hf_causal_lm_loss(tiny_decoder: DecoderBase, tiny_llama_dir: Any) -> None:
    ids, attention, loss_mask = collate([render(tiny_decoder, CHAT)])
    t = targets(tiny_decoder.weights, forward(tiny_decoder.weights, ids, attention), ids, loss_mask)
    labels = torch.where(loss_mask.bool(), ids, -100)
    with torch.no_grad():
        expected = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir))(ids, labels=labels).loss
    torch.testing.assert_close(sft_loss(t), expected, atol=1e-5, rtol=0)
    assert 0 <= float(token_accuracy(t)) <= 1


def test_truncation_drops_context_from_the_left_and_keeps_the_final_turn(
    tiny_decoder: DecoderBase,
) -> None:
    long_chat = [*CHAT[:3], {"role": "user", "content": "tell me " * 20}, CHAT[4]]
    full = render(tiny_decoder, long_chat, max_len=1000)
    row = render(tiny_decoder, long_chat, max_len=60)
    assert len(row.input_ids) == 60 and row.input_ids == full.input_ids[-60:]
    assert target_text(tiny_decoder, row.input_ids, row.loss_mask) == "Paris.<|im_end|>"
    # A final turn longer than the window keeps its beginning, with one token of context.
    long_reply = [*CHAT[:4], {"role": "assistant", "content": "Paris " * 30}]
    row = render(tiny_decoder, long_reply, max_len=20)
    assert len(row.input_ids) == 20 and row.loss_mask == [0] + [1] * 19
    assert target_text(tiny_decoder, row.input_ids, row.loss_mask) == ("Paris " * 4)[:19]


def test_dpo_loss_matches_a_hand_computation() -> None:
    # Summed log-probs: policy chosen / rejected, reference chosen / rejected.
    pc, pr = torch.tensor([-10.0]), torch.tensor([-14.0])
    rc, rr = torch.tensor([-11.0]), torch.tensor([-12.0])
    beta = 0.1
    margin = beta * ((-10.0 - -11.0) - (-14.0 - -12.0))  # 0.1 * (1 - -2) = 0.3
    out = dpo_loss(pc, pr, rc, rr, beta)
    assert float(out.loss) == pytest.approx(math.log(1 + math.exp(-margin)))
    assert float(out.chosen_rewards[0]) == pytest.approx(0.1)
    assert float(out.rejected_rewards[0]) == pytest.approx(-0.2)
    smoothed = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.2)
    by_hand = 0.8 * math.log(1 + math.exp(-margin)) + 0.2 * math.log(1 + math.exp(margin))
    assert float(smoothed.loss) == pytest.approx(by_hand)


def test_dpo_reference_is_the_base_with_the_adapter_off(tiny_decoder: DecoderBase) -> None:
    prompt = CHAT[:4]
    chosen = render_reply(tiny_decoder.tokenizer, tiny_decoder.chat_template, prompt, CHAT[4], 256)
    rejected = render_reply(
        tiny_decoder.tokenizer,
        tiny_decoder.chat_template,
        prompt,
        {"role": "assistant", "content": "Lyon."},
        256,
    )
    assert target_text(tiny_decoder, chosen.input_ids, chosen.loss_mask) == "Paris.<|im_end|>"
    ids, attention, loss_mask = collate([chosen, rejected])
    w, cfg = tiny_decoder.weights, tiny_decoder.config
    n_in, n_out = cfg.linear_shape("q_proj")
    a = torch.randn(4, n_in, generator=torch.Generator().manual_seed(0))
    b = torch.zeros(n_out, 4, requires_grad=True)  # PEFT's init: the adapter starts as a no-op
    hooks = LoraHooks({(0, "q_proj"): (a, b)}, 2.0, 0.0)
    policy = reply_logprobs(w, ids, attention, loss_mask, hooks)
    with torch.no_grad():
        reference = reply_logprobs(w, ids, attention, loss_mask)
    torch.testing.assert_close(policy, reference, atol=1e-5, rtol=0)
    out = dpo_loss(policy[:1], policy[1:], reference[:1], reference[1:], beta=0.1)
    assert float(out.loss.detach()) == pytest.approx(math.log(2), abs=1e-5)
    out.loss.backward()  # the gradient reaches the adapter through the policy only
    assert b.grad is not None and b.grad.abs().sum() > 0


@pytest.mark.real_model
def test_smollm2_template_targets_exactly_the_replies(real_decoder: DecoderBase) -> None:
    row = render(real_decoder, CHAT)
    assert row.input_ids == real_decoder.tokenizer.apply_chat_template(CHAT)
    assert target_text(real_decoder, row.input_ids, row.loss_mask) == (
        "Hello!<|im_end|>Paris.<|im_end|>"
    )


def test_a_template_that_does_not_render_turn_by_turn_is_refused(
    tiny_decoder: DecoderBase,
) -> None:
    # The generation prompt (">>") is not how the rendered conversation continues, so which
    # characters are the reply's cannot be known.
    template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}>>{% endif %}"
    )
    with pytest.raises(DataError, match="turn by turn"):
        render_chat(tiny_decoder.tokenizer, template, CHAT[1:3], 64)
    with pytest.raises(DataError, match="no chat template"):
        render_chat(tiny_decoder.tokenizer, None, CHAT[1:3], 64)


def test_an_empty_final_reply_without_an_end_token_is_refused(tiny_decoder: DecoderBase) -> None:
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    empty = [CHAT[1], {"role": "assistant", "content": ""}]
    with pytest.raises(DataError, match="renders to no tokens"):
        render_chat(tiny_decoder.tokenizer, template, empty, 64)


def test_a_reply_with_no_token_left_to_learn_is_refused(tiny_decoder: DecoderBase) -> None:
    # The template renders nothing before the reply, so a one-token reply is the window's
    # first token, which nothing predicts: the row would have no target at all.
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}"
        "{% endif %}{% endfor %}"
    )
    reply = [CHAT[1], {"role": "assistant", "content": "A"}]
    assert len(tiny_decoder.tokenizer("A", add_special_tokens=False)["input_ids"]) == 1
    with pytest.raises(DataError, match="no reply token left to learn") as err:
        render_chat(tiny_decoder.tokenizer, template, reply, 64)
    assert err.value.field == "messages"
    rows = [{"messages": CHAT[1:3]}, {"messages": reply}]
    examples = coerce_decoder_examples(rows, "chat")
    with pytest.raises(DataError, match="no reply token left to learn") as err:
        encode_decoder(examples, tiny_decoder.tokenizer, template, 64)
    assert (err.value.row, err.value.field) == (1, "messages")


def test_sft_loss_of_a_batch_without_targets_is_zero_not_nan(tiny_decoder: DecoderBase) -> None:
    ids = torch.tensor([[1, 2, 3]])
    hidden = forward(tiny_decoder.weights, ids, torch.ones_like(ids)).requires_grad_(True)
    t = targets(tiny_decoder.weights, hidden, ids, torch.zeros_like(ids))
    loss = sft_loss(t)
    assert loss.item() == 0.0
    loss.backward()
    assert hidden.grad is not None and not hidden.grad.isnan().any()

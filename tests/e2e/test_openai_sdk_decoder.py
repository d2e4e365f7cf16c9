"""Chat SFT, DPO and a reward model on SmolLM2-135M-Instruct with the official OpenAI SDK,
over real HTTP, as the README shows them.

A real ``loraplex serve`` holding the decoder alone (embedded worker, SQLite in a temp dir)
runs README's chat blocks as written: OpenAI chat and DPO files go up with
``client.files.create``, an SFT job is created with the SDK's own ``method={"type":
"supervised", ...}``, then DPO with its adapter as the reference policy (``extra_body``), then
a reward model from preference rows; then chat with the base, the SFT adapter and best-of-n
with the reward adapter. The tests here check what those runs printed and left: adapters stored
on SmolLM2 that export as PEFT folders for a causal LM, OpenAI's metric names in the events,
streamed replies equal to whole ones, the reward adapter on ``/reward/compare`` and
``/predict``. Ten, eight and eight short rows keep the training to tens of seconds on two cores.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from service.config import DEFAULT_DECODER_NAME
from tests.e2e.server import ServerProcess
from tests.e2e.test_openai_sdk import sdk_client
from tests.e2e.test_readme import laid_out, readme_blocks, run_block, walkthrough_blocks

pytestmark = [pytest.mark.e2e, pytest.mark.real_model]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path_factory.mktemp("loraplex-decoder"),
        settings={
            "bases": DEFAULT_DECODER_NAME,
            "checkpoint_every_steps": 2,
            # 5 sequences of 512 tokens (22.5 MiB each in fp32), one of them reserved: the
            # README's best-of-n asks for 4 candidates.
            "generation_context_tokens": 512,
            "generation_kv_cache_mb": 128,
        },
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with sdk_client(server) as c:
        yield c


@dataclass(frozen=True)
class ReadmeRun:
    """What README's chat blocks printed, and the adapters they trained (by name)."""

    out: str
    sft: str
    dpo: str
    reward: str


@pytest.fixture(scope="module")
def readme(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> ReadmeRun:
    """README's "Fine-tune a chat model" SDK block, then the SDK blocks of "Generate: chat
    completions" that go on from its ``client``, ``finished`` and ``sft`` (the base, "Chat
    with your adapter", best-of-n), as written, against a real server: SFT, DPO from the SFT
    adapter and a reward model, the module's only training runs."""
    root = laid_out(tmp_path_factory.mktemp("readme"), server)
    tune = readme_blocks("## Fine-tune a chat model", "\n### ")
    generate = readme_blocks("## Generate: chat completions", "\n`/predict` takes")
    best_of_n = readme_blocks("**Best-of-n with a reward adapter**", "\nOver HTTP")
    assert [lang for lang, _ in tune] == ["text", "python"]
    assert [lang for lang, _ in generate] == ["bash", "python", "python"]
    assert [lang for lang, _ in best_of_n] == ["python"]
    script = "\n".join((tune[1][1], generate[1][1], generate[2][1], best_of_n[0][1]))
    out = run_block("python", script, root, server)
    names = {}
    for job in ("sft", "dpo"):
        line = next(line for line in out.splitlines() if line.startswith(f"{job} "))
        _, status, names[job] = line.split()
        assert status == "succeeded", (out, server.log_tail())
    with server.client() as http:
        adapters = http.get("/v1/adapters").raise_for_status().json()["data"]
    reward = next(a["name"] for a in adapters if a["task"] == "reward")
    return ReadmeRun(out, names["sft"], names["dpo"], reward)


def test_readme_chat_blocks_print_what_they_say(readme: ReadmeRun) -> None:
    lines = readme.out.splitlines()
    assert "Paris" in lines[2], readme.out  # the base's greedy answer, then the streamed haiku
    # The adapter's reply to "What is 3 plus 3?" and its usage, then best-of-n's four
    # candidates, best first, each with its reward.
    assert "CompletionUsage(" in lines[-5] and "prompt_tokens_details" in lines[-5], readme.out
    rewards = [float(line.split()[0]) for line in lines[-4:]]
    assert rewards == sorted(rewards, reverse=True), readme.out


def test_readme_curl_answers_with_the_walkthroughs_variables(
    server: ServerProcess, tmp_path: Path
) -> None:
    (_, curl), *_ = readme_blocks("## Generate: chat completions", "\n`/predict` takes")
    prelude = walkthrough_blocks()[0][1]
    prelude = prelude[: prelude.index("\n", prelude.index("URL="))]  # KEY, H and URL
    reply = json.loads(run_block("bash", f"{prelude}\n{curl}", laid_out(tmp_path, server), server))
    assert "Paris" in reply["choices"][0]["message"]["content"], reply


def test_sdk_uploads_and_jobs_store_decoder_adapters_with_openais_metrics(
    server: ServerProcess, client: openai.OpenAI, readme: ReadmeRun
) -> None:
    # /v1/files read each upload's kind from its first row.
    kinds = {f.filename: (f.model_extra or {}).get("kind") for f in client.files.list()}
    assert kinds == {
        "chat_small.jsonl": "chat",
        "dpo_small.jsonl": "dpo",
        "preference_small.jsonl": "preference",
    }
    sft = next(j for j in client.fine_tuning.jobs.list() if j.fine_tuned_model == readme.sft)
    assert sft.model == DEFAULT_DECODER_NAME and sft.trained_tokens and sft.trained_tokens > 0
    events = list(client.fine_tuning.jobs.list_events(sft.id, limit=50))
    steps = [e.data for e in events if e.type == "metrics" and e.data and "lr" in e.data]
    assert steps and all(d["train_loss"] > 0 for d in steps)
    assert any("valid_loss" in d and "valid_mean_token_accuracy" in d for d in steps)
    with server.client() as http:
        for name, task in ((readme.sft, "chat"), (readme.dpo, "dpo"), (readme.reward, "reward")):
            adapter = http.get(f"/v1/adapters/{name}").raise_for_status().json()
            assert (adapter["task"], adapter["base_model"]) == (task, DEFAULT_DECODER_NAME)
        _assert_peft_export(http, readme.dpo)


def test_chat_with_the_adapter_a_job_trained(client: openai.OpenAI, readme: ReadmeRun) -> None:
    """README's "Chat with your adapter": the job's fine_tuned_model is a model to chat with,
    whole and streamed."""
    question: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Answer with the number only."},
        {"role": "user", "content": "What is 3 plus 3?"},
    ]
    reply = client.chat.completions.create(
        model=readme.sft, messages=question, max_tokens=6, temperature=0
    )
    text = reply.choices[0].message.content
    assert text and reply.model == readme.sft
    stream = client.chat.completions.create(
        model=readme.sft, messages=question, max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def _assert_peft_export(http: httpx.Client, name: str) -> None:
    resp = http.get(f"/v1/adapters/{name}/export", params={"format": "peft"})
    resp.raise_for_status()
    with zipfile.ZipFile(io.BytesIO(resp.content)) as archive:
        config = json.loads(archive.read("adapter_config.json"))
        assert "adapter_model.safetensors" in archive.namelist()
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == DEFAULT_DECODER_NAME


def test_the_readmes_reward_model_on_smollm2_serves_compare_and_predict(
    server: ServerProcess, readme: ReadmeRun
) -> None:
    # OpenAI's dpo on preference rows trained a reward model, as on the encoder.
    with server.client() as http:
        pair = {"prompt": "What is 9 plus 9?", "response_a": "18", "response_b": "It is 9."}
        compared = http.post(f"/reward/compare?adapter={readme.reward}", json=pair)
        assert compared.status_code == 200, (compared.text, server.log_tail())
        result = compared.json()
        assert 0.0 < result["p_a_preferred"] < 1.0
        inputs = [[pair["prompt"], pair["response_a"]], [pair["prompt"], pair["response_b"]]]
        predicted = http.post(f"/predict?adapter={readme.reward}", json={"inputs": inputs})
        assert predicted.status_code == 200, predicted.text
        rewards = [p["reward"] for p in predicted.json()["predictions"]]
        # The same rows through the same scorer: the same rewards.
        assert rewards == pytest.approx([result["reward_a"], result["reward_b"]], abs=1e-4)

"""Chat SFT and DPO on SmolLM2-135M-Instruct with the official OpenAI SDK, over real HTTP.

A real ``loraplex serve`` holding the decoder alone (embedded worker, SQLite in a temp dir):
OpenAI chat and DPO files go up with ``client.files.create``, an SFT job is created with the
SDK's own ``method={"type": "supervised", ...}``, then DPO with its adapter as the reference
policy through loraplex's own job API; the adapters are stored on SmolLM2 and export as PEFT
folders for a causal LM, and the SFT job's ``fine_tuned_model`` answers chat completions
(README's "Chat with your adapter"). Few rows, short windows and a handful of steps keep it to
tens of seconds on two cores.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from openai.types.fine_tuning import FineTuningJob
from openai.types.fine_tuning.job_create_params import Method

from service.config import DEFAULT_DECODER_NAME
from tests.e2e.conftest import load_jsonl
from tests.e2e.server import ServerProcess, wait_job
from tests.e2e.test_openai_sdk import sdk_client, wait_for
from tests.e2e.test_readme import laid_out, readme_blocks, run_block, walkthrough_blocks

pytestmark = [pytest.mark.e2e, pytest.mark.real_model]

# Short rows, a 64-token window, batches of 4: a step of the 135M model is about a second.
HYPER = {"n_epochs": 1, "batch_size": 4, "max_seq_length": 64}


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


# The README's chat rows and DPO rows ("Fine-tune a chat model" uploads the same files).
CHAT = load_jsonl("chat_small.jsonl")
DPO = load_jsonl("dpo_small.jsonl")


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


def _trained(
    server: ServerProcess,
    client: openai.OpenAI,
    kind: str,
    rows: list[dict[str, Any]],
    method: Method,
) -> FineTuningJob:
    """A job of ``method`` on the decoder, trained on ``rows`` uploaded through the SDK (the
    upload read as ``kind``), succeeded."""
    upload = client.files.create(file=(f"{kind}.jsonl", jsonl(rows)), purpose="fine-tune")
    assert upload.model_extra and upload.model_extra["kind"] == kind
    job = client.fine_tuning.jobs.create(
        model=DEFAULT_DECODER_NAME, training_file=upload.id, method=method, seed=3
    )
    job, _ = wait_for(client, job.id)
    assert job.status == "succeeded", (job.error, server.log_tail())
    return job


@pytest.fixture(scope="module")
def sft_job(server: ServerProcess, client: openai.OpenAI) -> FineTuningJob:
    """One chat SFT job through the SDK, succeeded: its events, the DPO run it is the
    reference of and the chat with its adapter all read it (one training run, not three)."""
    method: Method = {"type": "supervised", "supervised": {"hyperparameters": HYPER}}
    return _trained(server, client, "chat", CHAT, method)


def test_chat_sft_with_the_sdk_then_dpo_from_its_adapter(
    server: ServerProcess, client: openai.OpenAI, sft_job: FineTuningJob
) -> None:
    job = sft_job
    assert job.model == DEFAULT_DECODER_NAME and job.fine_tuned_model
    assert job.trained_tokens and job.trained_tokens > 0
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=50))
    steps = [e.data for e in events if e.type == "metrics" and e.data and "lr" in e.data]
    assert steps and all(d["train_loss"] > 0 for d in steps)
    assert any("valid_loss" in d and "valid_mean_token_accuracy" in d for d in steps)

    with server.client() as http:
        sft = http.get(f"/v1/adapters/{job.fine_tuned_model}").raise_for_status().json()
        assert (sft["task"], sft["base_model"]) == ("chat", DEFAULT_DECODER_NAME)

        dpo = client.files.create(file=("dpo.jsonl", jsonl(DPO)), purpose="fine-tune")
        assert dpo.model_extra and dpo.model_extra["kind"] == "dpo"
        body = {
            "training_file": dpo.id,
            "reference_adapter": sft["name"],
            "method": {"type": "lora", "hyperparameters": {**HYPER, "beta": 0.1}},
            "seed": 3,
        }
        created = http.post("/v1/fine_tuning/jobs", json=body).raise_for_status().json()
        assert created["model"] == DEFAULT_DECODER_NAME  # the decoder, from the file's kind
        done = wait_job(http, created["id"])
        assert done["status"] == "succeeded", (done["error"], server.log_tail())
        adapter = http.get(f"/v1/adapters/{done['fine_tuned_model']}").raise_for_status().json()
        assert (adapter["task"], adapter["base_model"]) == ("dpo", DEFAULT_DECODER_NAME)
        _assert_peft_export(http, adapter["name"])


def test_chat_with_the_adapter_a_job_trained(client: openai.OpenAI, sft_job: FineTuningJob) -> None:
    """README's "Chat with your adapter": the job's fine_tuned_model is a model to chat with,
    whole and streamed."""
    model = sft_job.fine_tuned_model
    assert model
    question: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Answer with the number only."},
        {"role": "user", "content": "What is 3 plus 3?"},
    ]
    reply = client.chat.completions.create(
        model=model, messages=question, max_tokens=6, temperature=0
    )
    text = reply.choices[0].message.content
    assert text and reply.model == model
    stream = client.chat.completions.create(
        model=model, messages=question, max_tokens=6, temperature=0, stream=True
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


PREFERENCE = load_jsonl("preference_small.jsonl")


def test_a_reward_model_on_smollm2_through_the_sdk_serves_compare_and_predict(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    # OpenAI's dpo on preference rows trains a reward model, as on the encoder; model picks
    # the decoder (the only base here).
    method: Method = {"type": "dpo", "dpo": {"hyperparameters": HYPER}}
    job = _trained(server, client, "preference", PREFERENCE, method)
    name = job.fine_tuned_model
    with server.client() as http:
        adapter = http.get(f"/v1/adapters/{name}").raise_for_status().json()
        assert (adapter["task"], adapter["base_model"]) == ("reward", DEFAULT_DECODER_NAME)
        pair = {"prompt": "What is 9 plus 9?", "response_a": "18", "response_b": "It is 9."}
        compared = http.post(f"/reward/compare?adapter={name}", json=pair)
        assert compared.status_code == 200, (compared.text, server.log_tail())
        result = compared.json()
        assert 0.0 < result["p_a_preferred"] < 1.0
        inputs = [[pair["prompt"], pair["response_a"]], [pair["prompt"], pair["response_b"]]]
        predicted = http.post(f"/predict?adapter={name}", json={"inputs": inputs})
        assert predicted.status_code == 200, predicted.text
        rewards = [p["reward"] for p in predicted.json()["predictions"]]
        # The same rows through the same scorer: the same rewards.
        assert rewards == pytest.approx([result["reward_a"], result["reward_b"]], abs=1e-4)


def test_readme_chat_fine_tuning_and_generation_run_as_pasted(
    server: ServerProcess, tmp_path: Path
) -> None:
    """README's "Fine-tune a chat model" SDK block, then "Generate: chat completions" up to
    "Chat with your adapter" and best-of-n (curl with the walkthrough's variables; the SDK
    blocks, which go on from the first one's ``client``, ``finished`` and ``sft``), as
    written against a real server."""
    root = laid_out(tmp_path, server)
    tune = [
        code
        for lang, code in readme_blocks("## Fine-tune a chat model", "\n### ")
        if lang == "python"
    ]
    generate = readme_blocks("## Generate: chat completions", "\n`/predict` takes")
    best_of_n = readme_blocks("**Best-of-n with a reward adapter**", "\nOver HTTP")
    assert len(tune) == 1 and [lang for lang, _ in generate] == ["bash", "python", "python"]
    (_, curl), (_, sdk), (_, adapter_chat) = generate
    assert [lang for lang, _ in best_of_n] == ["python"]

    script = "\n".join((tune[0], sdk, adapter_chat, best_of_n[0][1]))
    out = run_block("python", script, root, server)
    lines = out.splitlines()
    sft, dpo = (
        next(line.split() for line in lines if line.startswith(f"{job} ")) for job in ("sft", "dpo")
    )
    assert sft[1] == dpo[1] == "succeeded", (out, server.log_tail())
    assert "Paris" in lines[2], out  # the base's greedy answer, then the streamed haiku
    # The adapter's reply to "What is 3 plus 3?", then its usage.
    assert "CompletionUsage(" in lines[-5] and "prompt_tokens_details" in lines[-5], out
    # Best-of-n: four candidates, best first, each with its reward.
    rewards = [float(line.split()[0]) for line in lines[-4:]]
    assert rewards == sorted(rewards, reverse=True), out

    prelude = walkthrough_blocks()[0][1]
    prelude = prelude[: prelude.index("\n", prelude.index("URL="))]  # KEY, H and URL
    reply = json.loads(run_block("bash", f"{prelude}\n{curl}", root, server))
    assert "Paris" in reply["choices"][0]["message"]["content"], reply

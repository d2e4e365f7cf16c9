"""README's "Chat with your adapter", over real HTTP: fine-tune SmolLM2 on chat rows with the
OpenAI SDK, then chat with the job's ``fine_tuned_model``, whole and streamed.

A real ``loraplex serve`` holding the decoder alone (embedded worker, SQLite in a temp dir);
a handful of training steps on short rows keep it to tens of seconds on two cores.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai.types.chat import ChatCompletionMessageParam

from service.config import DEFAULT_DECODER_NAME
from tests.e2e.server import ServerProcess
from tests.e2e.test_openai_sdk import sdk_client, wait_for
from tests.e2e.test_openai_sdk_decoder import CHAT, HYPER, jsonl

pytestmark = [pytest.mark.e2e, pytest.mark.real_model]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path_factory.mktemp("loraplex-chat"),
        settings={"bases": DEFAULT_DECODER_NAME, "generation_kv_cache_mb": 128},
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def test_chat_with_the_adapter_a_job_trained(server: ServerProcess) -> None:
    with sdk_client(server) as client:
        rows = client.files.create(file=("chat.jsonl", jsonl(CHAT)), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model=DEFAULT_DECODER_NAME,
            training_file=rows.id,
            method={"type": "supervised", "supervised": {"hyperparameters": HYPER}},
            seed=3,
        )
        job, _ = wait_for(client, job.id)
        assert job.status == "succeeded", (job.error, server.log_tail())
        assert job.fine_tuned_model
        question: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": "Answer with the number only."},
            {"role": "user", "content": "What is 3 plus 3?"},
        ]
        reply = client.chat.completions.create(
            model=job.fine_tuned_model,
            messages=question,
            max_tokens=6,
            temperature=0,
        )
        text = reply.choices[0].message.content
        assert text and reply.model == job.fine_tuned_model
        stream = client.chat.completions.create(
            model=job.fine_tuned_model,
            messages=question,
            max_tokens=6,
            temperature=0,
            stream=True,
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text

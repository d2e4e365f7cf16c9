"""From validated request inputs to engine rows and back: shared by predict and compare."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio.to_thread

from service.errors import ErrorKind, ServiceError, not_found, unavailable
from service.serving.batcher import Batcher, QueueFullError, tenant_of
from service.serving.policy import RequestMode
from service.serving.queries import AdapterGone, AdapterRef

if TYPE_CHECKING:
    from core.base import FrozenBase
    from core.inference import Row, RowResult
    from core.inference.residency import AdapterTooLargeError

RETRY_AFTER_S = 1
T = TypeVar("T")


class RowSource(Protocol):
    """Turns a request's inputs into engine rows in the request's thread, in its tenant's
    turn: the encoder's :class:`RequestTokenizer`, a decoder's
    :class:`service.serving.decoder_scoring.DecoderRowEncoder`."""

    async def rows_in_turn(
        self, ref: AdapterRef, items: list[tuple[str, str | None]], truncate: bool, param: str
    ) -> list[Row]: ...


class TenantTurns:
    """One request of a tenant at a time in a worker thread (:meth:`run`); the tenant's other
    requests wait on the event loop, holding no thread (see :class:`RequestTokenizer`).
    Used on the event loop only."""

    def __init__(self) -> None:
        # A tenant's turn, and how many of its requests hold or wait for it (the entry goes
        # once none do).
        self._turns: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    async def run(self, tenant: Hashable, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread, in ``tenant``'s turn."""
        turn, users = self._turns.get(tenant) or (asyncio.Lock(), 0)
        self._turns[tenant] = (turn, users + 1)
        try:
            async with turn:
                return await anyio.to_thread.run_sync(fn, *args)
        finally:
            turn, users = self._turns[tenant]
            if users == 1:
                del self._turns[tenant]
            else:
                self._turns[tenant] = (turn, users - 1)


def check_request_chars(items: list[tuple[str, str | None]], limit: int, param: str) -> None:
    """413 when a request's texts hold more than ``limit`` characters in all. The routes check
    the texts as the client sent them, before any are tokenized: /reward/compare's rows hold a
    pair's prompt twice (once per response), so a check of the rows would count it twice."""
    chars = sum(len(text) + len(pair or "") for text, pair in items)
    if chars > limit:
        raise ServiceError(
            f"the {param} hold {chars} characters in all; one request takes at most "
            f"{limit} (LORAPLEX_MAX_REQUEST_CHARS): split it",
            code="request_too_large",
            param=param,
            kind=ErrorKind.TOO_LARGE,
        )


class RowError(ServiceError):
    """An error of one of a request's rows (``row``, its index in the request's items): its
    message is ``f"{subject} {predicate}"``, and it names the row ``input {row}``, ``param``
    ``{param}.{row}``, as /predict numbers its inputs. A route whose rows are not its body's
    items one to one (/reward/compare: two rows a pair) names the field itself
    (:meth:`named`). ``first_text``: the row's first text is at fault, not its second (a pair
    whose second text fits the window alone, such as a reward row's response)."""

    def __init__(
        self,
        predicate: str,
        *,
        code: str,
        kind: ErrorKind,
        param: str,
        row: int,
        first_text: bool = False,
    ) -> None:
        super().__init__(f"input {row} {predicate}", code=code, param=f"{param}.{row}", kind=kind)
        self.predicate = predicate
        self.row = row
        self.first_text = first_text

    def named(self, subject: str, param: str) -> ServiceError:
        """The same error about the field ``param``, called ``subject`` in the message."""
        return ServiceError(
            f"{subject} {self.predicate}", code=self.code, param=param, kind=self.kind
        )


class RequestTokenizer:
    """Turns a request's inputs into engine rows with their token ids, in the request's thread.

    The batcher's owner thread then never tokenizes (docs/architecture.md invariant 3), so a
    request's texts cost its own thread, not every tenant's batch. What one request may cost
    is bounded twice: ``max_request_chars`` over all its texts (checked by the routes, on the
    texts as sent: :func:`check_request_chars`), and the window per text
    (:class:`core.inference.RowEncoder` reads no more than the window needs).

    Each tenant tokenizes one request at a time (:meth:`rows_in_turn`); its other requests
    wait on the event loop, holding neither a worker thread nor one of the encoder's few
    tokenizer copies. Otherwise a tenant sending many maximal requests at once (each ~0.5 s of
    a core to tokenize for MiniLM) would hold every copy, and past the threadpool's size every
    thread, while another tenant's one-text request waited for one. One at a time costs a
    tenant no throughput that matters: its rows then wait for the batcher, which computes
    them far slower (a maximal request: ~0.5 s to tokenize, ~35 s to compute on 2 cores).
    """

    def __init__(self, base: FrozenBase) -> None:
        from core.inference import RowEncoder

        self._encoder = RowEncoder(base)
        self.max_length = base.max_length
        self._turns = TenantTurns()

    async def rows_in_turn(
        self, ref: AdapterRef, items: list[tuple[str, str | None]], truncate: bool, param: str
    ) -> list[Row]:
        """:meth:`rows` in a worker thread, once no other request of ``ref``'s tenant is
        being tokenized."""
        return await self._turns.run(tenant_of(ref.key), self.rows, ref, items, truncate, param)

    def rows(
        self, ref: AdapterRef, items: list[tuple[str, str | None]], truncate: bool, param: str
    ) -> list[Row]:
        """Rows for ``items``; with ``truncate=False``, a 422 for the first input longer than
        the adapter's window."""
        from core.inference import Row

        window = ref.window(self.max_length)  # the adapter's trained length
        if not truncate:
            self._check(items, window, param)
        encode = self._encoder.encode_responses if ref.task == "reward" else self._encoder.encode
        encoded = encode(items, window)
        return [
            Row(ref.key, text, pair, encoded=enc)
            for (text, pair), enc in zip(items, encoded, strict=True)
        ]

    def _check(self, items: list[tuple[str, str | None]], window: int, param: str) -> None:
        for i, (text, pair) in enumerate(items):
            n = self._encoder.count(text, pair)
            if n > window:
                raise RowError(
                    f"is {n} tokens long; the model takes at most {window} (send "
                    "truncate=true to cut it)",
                    code="input_too_long",
                    kind=ErrorKind.INVALID,
                    param=param,
                    row=i,
                    first_text=pair is None or self._encoder.count(pair, None) <= window,
                )


async def infer(
    tokenizer: RowSource,
    batcher: Batcher,
    ref: AdapterRef,
    items: list[tuple[str, str | None]],
    truncate: bool,
    param: str,
    mode: RequestMode,
) -> list[RowResult]:
    """Results for ``items`` on ``ref``'s adapter: tokenized in a worker thread in its
    tenant's turn (:meth:`RequestTokenizer.rows_in_turn`), then computed by ``batcher``.
    Cancelled (its client gone), it queues nothing more, and the batcher drops its rows not
    yet in a batch."""
    from core.errors import AdapterFormatError
    from core.inference.execute import NonFiniteOutputError

    rows = await tokenizer.rows_in_turn(ref, items, truncate, param)
    try:
        results = await batcher.submit(rows, mode)
    except AdapterGone:
        raise not_found("adapter", str(rows[0].key[1]), "adapter") from None  # type: ignore[index]
    except AdapterFormatError as e:
        raise _unreadable(ref, e) from None
    except QueueFullError as e:
        raise unavailable(
            f"Too many queued requests ({e}); retry shortly.", "queue_full", RETRY_AFTER_S
        ) from None
    for i, r in enumerate(results):
        if isinstance(r.error, NonFiniteOutputError):
            raise _non_finite(ref, i, param)
        if not r.ok:
            raise _row_error(r.error, rows[0].key)
    return results


def _non_finite(ref: AdapterRef, row: int, param: str) -> RowError:
    """A row the adapter's weights overflow on (inf or NaN): never a 200 with nulls. The
    adapter's state forbids the answer, not the request (as for ``adapter_unreadable``)."""
    return RowError(
        f"gives adapter {ref.key[1]!r} an output that is not a finite number (inf or NaN): its "
        "weights overflow on it; train or import the adapter again with smaller weights",
        code="non_finite_output",
        kind=ErrorKind.CONFLICT,
        param=param,
        row=row,
    )


def _unreadable(ref: AdapterRef, error: Exception) -> ServiceError:
    """A stored adapter this release cannot load (its config refused, say one saved by a
    release whose head fields differ): its state forbids serving it, not the request."""
    return ServiceError(
        f"adapter {ref.key[1]!r} is stored in a form this server cannot load ({error}); "
        "train or upload it again",
        code="adapter_unreadable",
        param="adapter",
        kind=ErrorKind.CONFLICT,
    )


def _row_error(error: Any, key: Any) -> ServiceError:
    from core.inference import AdapterNotResidentError
    from core.inference.residency import AdapterTooLargeError

    name = key[1] if isinstance(key, tuple) else str(key)
    if isinstance(error, AdapterGone | AdapterNotResidentError):
        return not_found("adapter", name, "adapter")
    if isinstance(error, AdapterTooLargeError):
        return _too_large_for_cache(name, error)
    return ServiceError("inference failed", code="inference_failed", kind=ErrorKind.INTERNAL)


def _too_large_for_cache(name: str, error: AdapterTooLargeError) -> ServiceError:
    """An adapter larger than the whole adapter cache: no retry serves it, only a larger
    LORAPLEX_ADAPTER_CACHE_MB (the engine's budget is that many MiB)."""
    mib = 1 << 20
    return ServiceError(
        f"adapter {name!r} needs {error.nbytes} bytes in the adapter cache, more than all of it "
        f"(LORAPLEX_ADAPTER_CACHE_MB={error.budget // mib}): it can be served once that is at "
        f"least {-(-error.nbytes // mib)}",
        code="adapter_too_large_for_cache",
        param="adapter",
        kind=ErrorKind.CONFLICT,
    )

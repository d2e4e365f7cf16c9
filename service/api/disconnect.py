"""Inference work given up when its client goes away.

A client that disconnects (a timeout, a closed tab) while its rows wait in the batcher would
still have them computed, for nobody: a flooding tenant whose clients time out would keep
taking its share of every batch. :func:`unless_disconnected` watches the connection while the
route waits and cancels the work on ``http.disconnect``: the batcher drops the request's rows
not yet in a batch (``Batcher.submit``), and a request still tokenizing is never queued.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import ClientDisconnect, Request

from service.bases import check_adapter_base
from service.serving.decoder_scoring import decoder_scorer_for
from service.serving.run import infer
from service.state import app_state

if TYPE_CHECKING:
    from core.inference import RowResult
    from service.serving.policy import RequestMode
    from service.serving.queries import AdapterRef

T = TypeVar("T")


async def served_results(
    request: Request,
    ref: AdapterRef,
    items: list[tuple[str, str | None]],
    truncate: bool,
    param: str,
    mode: RequestMode,
) -> list[RowResult]:
    """The inference routes' one path: ``items`` tokenized and computed on ``ref``'s adapter
    by the app's tokenizer and batcher (:func:`service.serving.run.infer`), given up if the
    client disconnects meanwhile. A decoder's classifier or reward model is computed by its
    base's scorer (:mod:`service.serving.decoder_scoring`); an adapter of a base this
    deployment does not load, or a decoder's chat adapter, is refused first."""
    state = app_state(request)
    if ref.base_kind == "decoder":
        scorer = decoder_scorer_for(state, ref, "adapter")
        return await unless_disconnected(request, scorer.results(ref, items, truncate, param))
    tokenizer, batcher = state.require_request_tokenizer(), state.require_batcher()
    check_adapter_base(
        ref.base_model,
        ref.base_fingerprint,
        state.require_base_model(),
        "adapter",
        "This route serves the encoder; a decoder's adapters are served by /v1/chat/completions.",
    )
    return await unless_disconnected(
        request, infer(tokenizer, batcher, ref, items, truncate, param, mode)
    )


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result, or :class:`ClientDisconnect` (answered 499 and logged at INFO by
    ``service.api.errors``) once the client is gone, with ``work`` cancelled.

    The request's body must have been read: the watcher takes the connection's next messages.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the route itself is cancelled (the server shutting down)
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    if watcher.cancelled() or watcher.exception() is not None:
        return await task  # the connection could not be watched: the work goes on
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():  # it ended first anyway: nobody reads how (nor logs it unread)
        task.exception()
    raise ClientDisconnect


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects. Before that, the server's ``receive`` only waits:
    the body was read, and a message left over from it (a re-delivered body) is skipped."""
    while (await request.receive())["type"] != "http.disconnect":
        pass

"""Prompt prefixes' keys and values kept across requests (vLLM's automatic prefix caching).

Chat prompts share their beginnings: SmolLM2's template opens every conversation that has no
system message with the same 25-token system turn, a deployment's own system prompt is the
same for all its requests, and each turn of a conversation starts with the whole of the turn
before it. The keys and values of a prefix depend only on its tokens and the weights that
computed them, so a request whose prompt starts with a cached prefix copies those columns
into its slot and prefills only the rest (a chunk continuing from ``past``, as chunked
prefill does: :mod:`core.generation.prefill`).

Blocks of :data:`BLOCK_TOKENS` tokens: a prompt's ``j``-th block is cached under its scope,
the entry of the block before it and its own tokens, so a block is found only behind the
very prefix it was computed after. Entries are numbered once and never reused, so a block
whose parent was evicted can never be found behind another prefix; it ages out.

The scope is the request's owner (a tenant) and adapter: the adapter's LoRA deltas on
k_proj / v_proj change the keys and values, and a cache shared between tenants would let
one learn from its own first token's latency whether another had just sent a prompt
(the side channel vLLM's ``cache_salt`` closes). The keys and values a block holds were
computed by whichever pass first prefilled it (packed with other prompts or not, on a merged
copy of its adapter or with the deltas), which rounds differently in the last bits than a
prompt's own pass: in fp32 the logits move by ~1e-6; in bfloat16 a near-tie may go the other
way, as it may between a prompt packed with others and the same prompt alone.

Blocks live in one pool per layer, allocated when the cache is made; the least recently used
block goes first when the pool is full. A load or a store touches a prefix's blocks from the
last to the first, so a block is always more recent than the blocks after it and evicted
after them. Owned by the scheduler's thread, like the slot cache.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable, Iterable

import torch
from torch import Tensor

from core.decoder.config import DecoderConfig
from core.generation.kv import SlotCache, bytes_per_slot

# Tokens a block holds. Small enough that SmolLM2's 25-token system turn is cached to its 24th
# token (16 would stop at the 16th); a lookup costs one dict probe a block.
BLOCK_TOKENS = 8

Scope = tuple[Hashable, Hashable]  # (owner, adapter key; None for the bare base)
_Key = tuple[Scope, int, tuple[int, ...]]  # (scope, the parent's entry or -1, the tokens)


class PrefixCache:
    """Keys and values ``[blocks, kv_heads, BLOCK_TOKENS, head_dim]`` per layer, by prefix."""

    def __init__(
        self,
        config: DecoderConfig,
        blocks: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if blocks < 1:
            raise ValueError("a prefix cache needs at least one block")
        shape = (blocks, config.num_key_value_heads, BLOCK_TOKENS, config.head_dim)
        # Empty, not zeros: a block is only ever read after it was written.
        self.keys: list[Tensor] = [
            torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self.values: list[Tensor] = [torch.empty_like(k) for k in self.keys]
        self._entry_of: dict[_Key, int] = {}
        self._blocks: OrderedDict[int, tuple[int, _Key]] = OrderedDict()  # least recent first
        self._free = list(range(blocks))
        self._entries = itertools.count()
        # A plain number the owner thread writes, for /metrics to read from another thread.
        self.hit_tokens = 0  # prompt tokens copied from the cache instead of prefilled

    @classmethod
    def for_budget(
        cls, config: DecoderConfig, budget_bytes: int, dtype: torch.dtype, device: torch.device
    ) -> PrefixCache | None:
        """A cache of as many blocks as ``budget_bytes`` holds; None if not even one."""
        blocks = budget_bytes // bytes_per_slot(config, BLOCK_TOKENS, dtype)
        return cls(config, blocks, dtype, device) if blocks else None

    @property
    def capacity(self) -> int:
        """Blocks the pool holds."""
        return self.keys[0].shape[0]

    @property
    def used(self) -> int:
        """Blocks holding a prefix."""
        return len(self._blocks)

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def lookup(self, scope: Scope, prompt: list[int]) -> list[int]:
        """The entries of the longest cached prefix of ``prompt``, whole blocks, leaving at
        least its last token to prefill (its hidden state gives the first new token)."""
        found: list[int] = []
        parent = -1
        for start in range(0, len(prompt) - BLOCK_TOKENS, BLOCK_TOKENS):
            entry = self._entry_of.get((scope, parent, tuple(prompt[start : start + BLOCK_TOKENS])))
            if entry is None:
                break
            found.append(entry)
            parent = entry
        return found

    def load(self, entries: list[int], cache: SlotCache, slots: list[int]) -> int:
        """Copy the prefix ``entries`` (from :meth:`lookup`, this step) into columns
        ``0..`` of each of ``slots``; the number of tokens copied."""
        if not entries:
            return 0
        tokens = len(entries) * BLOCK_TOKENS
        rows = torch.tensor([self._blocks[e][0] for e in entries], device=self.keys[0].device)
        for pool, layers in ((self.keys, cache.keys), (self.values, cache.values)):
            for block, layer in zip(pool, layers, strict=True):
                # [m, kv_heads, B, head_dim] -> [kv_heads, m·B, head_dim]
                columns = (
                    block.index_select(0, rows)
                    .transpose(0, 1)
                    .reshape(block.shape[1], tokens, block.shape[3])
                )
                for slot in slots:
                    layer[slot, :, :tokens] = columns
        self._touch(entries)
        self.hit_tokens += tokens
        return tokens

    def store(self, scope: Scope, tokens: list[int], cache: SlotCache, slot: int) -> None:
        """Cache the whole blocks of ``tokens``, whose keys and values are columns ``0..`` of
        ``slot``; blocks already cached are kept (and touched), not copied again. New blocks
        can be found only once their columns are copied: a copy that fails adds none."""
        chain: list[int] = []  # the prefix's blocks already cached, in order
        new: list[tuple[int, _Key, int]] = []  # the blocks after them: (entry, key, pool row)
        parent = -1
        for j in range(len(tokens) // BLOCK_TOKENS):
            key: _Key = (scope, parent, tuple(tokens[j * BLOCK_TOKENS : (j + 1) * BLOCK_TOKENS]))
            # After the first block not cached no later one is: each is keyed by its parent.
            entry = None if new else self._entry_of.get(key)
            if entry is None:
                row = self._allocate(protected=set(chain))
                if row is None:  # the pool holds less than this prefix: keep what fits
                    break
                entry = next(self._entries)
                new.append((entry, key, row))
            else:
                self._blocks.move_to_end(entry)  # not evicted for this prefix's later blocks
                chain.append(entry)
            parent = entry
        if new:
            start, stop = len(chain) * BLOCK_TOKENS, (len(chain) + len(new)) * BLOCK_TOKENS
            rows = torch.tensor([row for _, _, row in new], device=self.keys[0].device)
            try:
                for pool, layers in ((self.keys, cache.keys), (self.values, cache.values)):
                    for block, layer in zip(pool, layers, strict=True):
                        _, kv_heads, _, head_dim = layer.shape
                        columns = layer[slot, :, start:stop].reshape(
                            kv_heads, len(new), BLOCK_TOKENS, head_dim
                        )
                        block[rows] = columns.transpose(0, 1)
            except BaseException:
                self._free.extend(row for _, _, row in new)
                raise
            for entry, key, row in new:
                self._entry_of[key] = entry
                self._blocks[entry] = (row, key)
                chain.append(entry)
        self._touch(chain)

    def invalidate(self, adapter: Hashable) -> None:
        """Drop every block computed with the adapter ``adapter`` (deleted or replaced)."""
        for entry, (row, key) in list(self._blocks.items()):
            if key[0][1] == adapter:
                self._drop(entry, row, key)

    def _allocate(self, protected: set[int]) -> int | None:
        """A free pool row, evicting the least recently used block if none is free (never one
        in ``protected``); None if only protected blocks, or rows being stored, are left."""
        if self._free:
            return self._free.pop()
        if not self._blocks:
            return None
        entry, (row, key) = next(iter(self._blocks.items()))
        if entry in protected:
            return None
        self._drop(entry, row, key)
        return self._free.pop()

    def _drop(self, entry: int, row: int, key: _Key) -> None:
        del self._blocks[entry]
        del self._entry_of[key]
        self._free.append(row)

    def _touch(self, chain: Iterable[int]) -> None:
        """Most recent first for the prefix's first block: touched last to first."""
        for entry in reversed(list(chain)):
            self._blocks.move_to_end(entry)

"""A paged KV cache: per layer, one pool of fixed-size blocks of keys and values, handed out to
sequences on demand (vLLM's PagedAttention layout, attended by gathering a sequence's blocks).

A static cache reserves `max_len` positions for every slot; here a request holds only the blocks
its prompt and `max_new_tokens` need, so many short requests and a few long ones share one pool
sized in bytes. Requests sharing a prompt prefix (a system prompt) share its full blocks: the
prefix is computed once, and its blocks stay cached after their last user leaves, until the pool
needs them back (least recently used first). The pool stores the kv heads only: with
grouped-query attention SDPA's `enable_gqa` expands them on the fly.
"""

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

BLOCK_SIZE = 16  # positions per block: vLLM's default, small enough to waste little


class BlockPool:
    """Which blocks are free, held (by how many sequences) or cached (a prefix nobody holds).
    Bookkeeping only, on the host; the engine thread alone calls it."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # popped lowest first
        self._holders = [0] * num_blocks
        self._cached: OrderedDict[int, None] = OrderedDict()  # held by none, oldest first
        self._by_prefix: dict[int, int] = {}  # prefix key -> block holding its last positions
        self._prefix_of: dict[int, int] = {}  # block -> its prefix key

    @property
    def available(self) -> int:
        """Blocks a new sequence could take: free ones, and cached ones it would evict."""
        return len(self._free) + len(self._cached)

    def match(self, keys: Sequence[int]) -> list[int]:
        """The blocks already holding the longest run of these prefix keys."""
        blocks = []
        for key in keys:
            block = self._by_prefix.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def take(self, shared: list[int], new: int) -> list[int] | None:
        """Hold `shared` (from `match`) and `new` more blocks; None, holding nothing, when the
        pool can't give them."""
        if new > self.available - sum(b in self._cached for b in shared):
            return None
        for block in shared:
            self._hold(block)
        fresh = [self._free.pop() if self._free else self._evict() for _ in range(new)]
        for block in fresh:
            self._hold(block)
        return shared + fresh

    def publish(self, blocks: list[int], keys: Sequence[int]) -> None:
        """Let later sequences share `blocks[i]`, whose positions are those of prefix `keys[i]`."""
        for block, key in zip(blocks, keys):
            if key not in self._by_prefix and block not in self._prefix_of:
                self._by_prefix[key], self._prefix_of[block] = block, key

    def give_back(self, blocks: list[int]) -> None:
        for block in blocks:
            self._holders[block] -= 1
            if self._holders[block] == 0:
                if block in self._prefix_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    def _hold(self, block: int) -> None:
        self._holders[block] += 1
        self._cached.pop(block, None)

    def _evict(self) -> int:
        block, _ = self._cached.popitem(last=False)
        del self._by_prefix[self._prefix_of.pop(block)]
        return block


def prefix_keys(tokens: Sequence[int], block_size: int) -> list[int]:
    """One key per full block of `tokens`, naming that block's tokens and every token before."""
    keys, key = [], 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        key = hash((key, tuple(tokens[start : start + block_size])))
        keys.append(key)
    return keys


class PagedKVCache(nn.Module):
    """`num_blocks` blocks of `block_size` positions per layer, and for each of `slots` sequences
    the table of its blocks (up to `max_len` positions)."""

    def __init__(
        self,
        n_layers: int,
        slots: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = BLOCK_SIZE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        if slots <= 0 or max_len <= 0 or num_blocks <= 0:
            raise ValueError(
                f"KV cache needs slots, max_len and blocks > 0, got {slots}, {max_len}, "
                f"{num_blocks}"
            )
        self.n_layers, self.slots, self.max_len = n_layers, slots, max_len
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        # Positions before heads: a sequence's gathered blocks are then its positions in order
        # as a view, with no second copy to reorder them.
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        for i in range(n_layers):
            self.register_buffer(f"k_{i}", torch.zeros(shape, dtype=dtype, device=device), False)
            self.register_buffer(f"v_{i}", torch.zeros(shape, dtype=dtype, device=device), False)
        # One spare column: a decode gathers the first columns of the table, never all of them
        # (a compiled graph would specialize for a full-length `narrow`).
        columns = math.ceil(max_len / block_size) + 1
        self.register_buffer(
            "tables", torch.zeros(slots, columns, dtype=torch.long, device=device), False
        )
        self._blocks: dict[int, list[int]] = {}  # slot -> its blocks

    def blocks_for(self, positions: int) -> int:
        return (positions + self.block_size - 1) // self.block_size  # integers: symbolic-safe

    def read_len(self, keys_len: int) -> int:
        """How many positions `read` returns: `keys_len` rounded up to whole blocks."""
        return self.blocks_for(keys_len) * self.block_size

    def assign(self, slot: int, prompt: Sequence[int], positions: int) -> int | None:
        """Give `slot` the blocks for `positions` positions, sharing the cached blocks of the
        prompt's longest known prefix (never its last token, whose logits the prefill must
        compute). Returns how many leading prompt positions are cached already, or None when
        the pool can't hold the sequence now (it should wait)."""
        keys = prefix_keys(prompt[:-1], self.block_size)
        shared = self.pool.match(keys)
        blocks = self.pool.take(shared, self.blocks_for(positions) - len(shared))
        if blocks is None:
            return None
        self._blocks[slot] = blocks
        self.tables[slot, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        return len(shared) * self.block_size

    def publish_prompt(self, slot: int, prompt: Sequence[int]) -> None:
        """After its prefill: let later requests share the full blocks of `slot`'s prompt."""
        self.pool.publish(self._blocks[slot], prefix_keys(prompt, self.block_size))

    def release(self, slot: int) -> None:
        self.pool.give_back(self._blocks.pop(slot))

    def holds(self, slot: int) -> bool:
        return slot in self._blocks

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's whole key and value pools (no copy)."""
        return getattr(self, f"k_{i}"), getattr(self, f"v_{i}")

    def write(
        self,
        i: int,
        slots_b: torch.Tensor,
        positions_bs: torch.Tensor,
        k_bshd: torch.Tensor,
        v_bshd: torch.Tensor,
    ) -> None:
        """Store row b's keys and values at positions `positions_bs[b]` of slot `slots_b[b]`."""
        blocks_bs = self.tables[slots_b[:, None], positions_bs // self.block_size]
        offsets_bs = positions_bs % self.block_size
        keys, values = self.layer(i)
        keys[blocks_bs, offsets_bs] = k_bshd
        values[blocks_bs, offsets_bs] = v_bshd

    def read(
        self, i: int, slots_b: torch.Tensor, keys_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (rows, kv heads, L, head_dim) of each row's slot at positions 0..L-1,
        L being `keys_len` rounded up to whole blocks (past a row's position they are stale or
        another sequence's: mask them)."""
        columns_bn = self.tables.narrow(1, 0, self.blocks_for(keys_len))[slots_b]
        rows, blocks = columns_bn.shape
        keys, values = self.layer(i)
        return tuple(
            _gather_blocks(t, columns_bn)
            .view(rows, blocks * self.block_size, *t.shape[2:])
            .transpose(1, 2)
            for t in (keys, values)
        )

    @property
    def nbytes(self) -> int:
        keys, values = self.layer(0)
        return self.n_layers * (keys.nbytes + values.nbytes)


def _gather_blocks(pool: torch.Tensor, columns_bn: torch.Tensor) -> torch.Tensor:
    """The pool's blocks `columns_bn` (rows, blocks, block_size, ...): the positions of each row
    in order, heads after them. Eager: `index_select` of whole blocks copies at memory speed
    (advanced indexing, 4x slower on CPU, measured). Compiled: advanced indexing, which inductor
    turns into a vectorized copy per block; its `index_select` of the flattened table became a
    scalar loop of divisions (a compiled batch-8 step slower than eager, measured)."""
    if torch.compiler.is_compiling():
        return pool[columns_bn]
    return pool.index_select(0, columns_bn.flatten()).view(*columns_bn.shape, *pool.shape[1:])

"""Paged KV cache bookkeeping: integer block ids, an LRU free list, reference counts, and prefix caching.

A full block is named by a hash chain over its tokens and every block before it. With prefix caching,
a new sequence starts from the longest chain of cached blocks that matches its tokens, and a freed block
keeps its contents (and its name) until it is evicted, least recently freed first.

A forked sequence shares all its parent's blocks. Full blocks are never written again, so only a shared,
partly filled last block is copied, when one of its holders first writes to it (copy on write).

With swapping, a preempted sequence's blocks are copied to a pool of host blocks and back when it resumes.

With a sliding window over every layer, a sequence gives up the blocks before its next token's window: its block
table keeps their places, holding the null block (block 0, never allocated then), which attention never reads.
"""
from __future__ import annotations

import bisect
from collections import OrderedDict, deque

from kvserve.core.engine.sequence import Sequence


def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """A full block's key in the prefix cache: its tokens and, through ``parent`` (the key of the block before
    it, None for the first), every token before them."""
    return hash((parent, tokens))


def chain_root(seq: Sequence) -> int | None:
    """The parent of a sequence's first block: None, or its LoRA adapter's id, since an adapter changes the keys
    and values of the same tokens."""
    return None if not seq.lora_id else hash(("lora", seq.lora_id))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, num_host_blocks: int = 0,
                 sliding_window: int | None = None):
        """``sliding_window``: every layer's, where each attends only to that many latest tokens. ``num_blocks``
        counts the cache's blocks; the attribute, those that sequences can hold (not the null block)."""
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.window = sliding_window
        self.null_block = None if sliding_window is None else 0
        first = 0 if sliding_window is None else 1
        self.num_blocks = num_blocks - first
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(first, num_blocks))   # oldest first
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}          # hash -> block holding that content
        self.prefix_queries = 0                   # prompt tokens looked up in the cache
        self.prefix_hits = 0                      # ... and found there
        self.named_this_step: list[int] = []      # blocks named by the step being scheduled, not yet computed
        self.copies_this_step: list[tuple[int, int]] = []   # (source, destination) to copy before the step runs
        self.free_host_blocks = deque(range(num_host_blocks))
        self.swap_outs_this_step: list[tuple[int, int]] = []   # (device block, host block)
        self.swap_ins_this_step: list[tuple[int, int]] = []    # (host block, device block)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def try_admit(self, seq: Sequence, budget: int, allow_partial: bool) -> int:
        """Attach the cached prefix of a new sequence and allocate blocks for its first chunk.

        Returns how many tokens to compute now, or 0 (changing nothing) when the chunk does not fit.
        """
        # Prompt logprobs need logits at every prompt position, so such a request computes its whole prompt.
        use_cache = self.prefix_caching and seq.params.prompt_logprobs is None
        hits = self._cached_prefix(seq) if use_cache else []
        cached_tokens = len(hits) * self.block_size
        todo = seq.num_tokens - cached_tokens
        n = min(todo, budget)
        if n < todo and not allow_partial:
            return 0
        idle_hits = sum(1 for block, _ in hits if self.ref_counts[block] == 0)
        if self.blocks_for(cached_tokens + n) - len(hits) > self.num_free_blocks - idle_hits:
            return 0
        if use_cache:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += cached_tokens
        for block, block_hash in hits:
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(block_hash)
        seq.num_computed_tokens = cached_tokens
        self.allocate_slots(seq, n)
        return n

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give ``seq`` blocks for ``num_new_tokens`` more tokens, copying a shared partial block it writes to;
        False (changing nothing) if too few blocks are free."""
        shared = self._shared_partial_block(seq)
        missing = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if missing + (shared is not None) > self.num_free_blocks:
            return False
        if shared is not None:
            source = seq.block_table[shared]
            self.ref_counts[source] -= 1
            seq.block_table[shared] = self._take_free_block()
            self.copies_this_step.append((source, seq.block_table[shared]))
        for _ in range(missing):
            seq.block_table.append(self._take_free_block())
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let ``child`` hold every block of ``parent``, as it is now."""
        for block in self._held(parent.block_table):
            self.ref_counts[block] += 1
        child.block_table, child.block_hashes = list(parent.block_table), list(parent.block_hashes)

    def swap_out(self, seq: Sequence) -> bool:
        """Give ``seq``'s device blocks up, their contents copied to host blocks; False if too few are free."""
        if len(self._held(seq.block_table)) > len(self.free_host_blocks):
            return False
        seq.host_blocks = [None if block == self.null_block else self.free_host_blocks.popleft()
                           for block in seq.block_table]
        self.swap_outs_this_step += [pair for pair in zip(seq.block_table, seq.host_blocks) if pair[1] is not None]
        hashes = seq.block_hashes
        self.free(seq)
        seq.block_hashes = hashes
        return True

    def swap_in(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Copy ``seq``'s host blocks back to device blocks, with room for ``num_new_tokens`` more tokens;
        False (changing nothing) if too few device blocks are free."""
        given_up = seq.host_blocks.count(None)
        if self.blocks_for(seq.num_computed_tokens + num_new_tokens) - given_up > self.num_free_blocks:
            return False
        seq.block_table = [self.null_block if host is None else self._take_free_block() for host in seq.host_blocks]
        self.swap_ins_this_step += [pair for pair in zip(seq.host_blocks, seq.block_table) if pair[0] is not None]
        self.release_host_blocks(seq)
        return self.allocate_slots(seq, num_new_tokens)

    def release_host_blocks(self, seq: Sequence) -> None:
        self.free_host_blocks.extend(block for block in seq.host_blocks if block is not None)
        seq.host_blocks = []

    def free_out_of_window(self, seq: Sequence) -> None:
        """Give up ``seq``'s leading blocks that no later token attends to: those wholly before its next token's
        window (none without a sliding window)."""
        if self.window is None:
            return
        stale = max(0, seq.num_computed_tokens - self.window + 1) // self.block_size
        table = seq.block_table
        # The blocks given up already are the table's first ones.
        first = bisect.bisect_left(range(stale), True, key=lambda i: table[i] != self.null_block)
        self._release(table[first:stale])
        table[first:stale] = [self.null_block] * (stale - first)

    def _shared_partial_block(self, seq: Sequence) -> int | None:
        """Index in ``seq``'s block table of the partly filled block its next token goes to, if others hold it."""
        index, offset = divmod(seq.num_computed_tokens, self.block_size)
        if offset and self.ref_counts[seq.block_table[index]] > 1:
            return index
        return None

    def commit(self, seq: Sequence, num_tokens: int) -> None:
        """Name the full blocks among ``seq``'s first ``num_tokens`` tokens, so other sequences can reuse them.

        The scheduler names blocks as it schedules them: a sequence admitted later in the same step may then
        reuse them, because every layer writes the step's keys and values before it attends.
        """
        if not self.prefix_caching:
            return
        for i in range(len(seq.block_hashes), num_tokens // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            block_hash = chain_hash(seq.block_hashes[-1] if seq.block_hashes else chain_root(seq), tokens)
            seq.block_hashes.append(block_hash)
            block = seq.block_table[i]
            if block_hash not in self.cached:   # else the same content is already cached in another block
                self.cached[block_hash] = block
                self.block_hash[block], self.block_tokens[block] = block_hash, tokens
                self.named_this_step.append(block)

    def forget_step(self) -> None:
        """The step failed: the blocks it named hold no valid keys and values."""
        for block in self.named_this_step:
            if self.block_hash[block] is not None:
                del self.cached[self.block_hash[block]]
                self.block_hash[block] = self.block_tokens[block] = None
        self.named_this_step = []

    def free(self, seq: Sequence) -> None:
        self._release(seq.block_table)
        seq.block_table, seq.block_hashes = [], []

    def trim(self, seq: Sequence) -> None:
        """Return the blocks past ``seq``'s tokens: those its rejected proposals took."""
        keep = self.blocks_for(seq.num_tokens)
        self._release(seq.block_table[keep:])
        del seq.block_table[keep:]

    def _held(self, blocks: list[int]) -> list[int]:
        return blocks if self.null_block is None else [block for block in blocks if block != self.null_block]

    def _release(self, blocks: list[int]) -> None:
        # Tail blocks first: they go to the old end of the free list and are evicted before the prefix.
        for block in reversed(self._held(blocks)):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None

    def _cached_prefix(self, seq: Sequence) -> list[tuple[int, int]]:
        """(block, hash) of the leading full blocks already cached; the last token is always left to compute."""
        hits, parent = [], chain_root(seq)
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = chain_hash(parent, tokens)
            block = self.cached.get(parent)
            if block is None or self.block_tokens[block] != tokens:
                break
            hits.append((block, parent))
        return hits

    def _take_free_block(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        if self.block_hash[block] is not None:   # evict the cached content it held
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = self.block_tokens[block] = None
        self.ref_counts[block] = 1
        return block

"""The paged KV cache: blocks handed out on demand and given back, prompt prefixes shared and
computed once with the same logits as the full forward, and a pool too small for the offered
load that queues requests instead of failing them."""

import pytest
import torch

from plugins.inference.decoder import ArborCachedForward
from plugins.inference.engine import create_engine, kv_block_bytes
from plugins.inference.kv_cache import BLOCK_SIZE, BlockPool, prefix_keys
from plugins.inference.sampling import SamplingParams
from tests.plugins.inference.test_cached_forward import TOL, reference_logits

GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)


def test_blocks_are_shared_held_cached_and_evicted_last_used_last():
    pool = BlockPool(4)
    keys = prefix_keys(list(range(40)), BLOCK_SIZE)  # two full blocks
    first = pool.take([], 3)
    pool.publish(first, keys)
    assert pool.match(keys) == first[:2]
    assert pool.match(prefix_keys(list(range(1, 41)), BLOCK_SIZE)) == []  # another start
    assert pool.take([], 2) is None and pool.available == 1  # nothing held was taken
    second = pool.take(pool.match(keys), 1)
    assert second[:2] == first[:2] and pool.available == 0
    pool.give_back(first)
    assert pool.available == 1  # the shared blocks are still held by `second`
    pool.give_back(second)
    assert pool.available == 4 and pool.match(keys) == first[:2]  # cached, not forgotten
    assert len(pool.take([], 3)) == 3  # two free blocks, then the oldest cached one
    assert pool.match(keys) == []  # block 0 evicted: its key and the chain after it are gone


def test_a_shared_prefix_is_computed_once_and_gives_the_full_forwards_logits(tiny_model):
    """Two prompts sharing 35 tokens: the second's prefill computes only past its 2 shared
    blocks (32 positions), and its logits equal the cache-free forward at every decode step."""
    forward = ArborCachedForward(tiny_model, slots=2, max_len=64)
    tokens = torch.randint(0, 384, (2, 64), generator=torch.Generator().manual_seed(3))
    tokens[1, :35] = tokens[0, :35]
    with torch.no_grad():
        assert forward.assign(0, tokens[0, :40].tolist(), 48) == 0
        forward.prefill(tokens[0, :40], 0)
        assert forward.assign(1, tokens[1, :45].tolist(), 64) == 2 * BLOCK_SIZE
        assert forward.cache._blocks[1][:2] == forward.cache._blocks[0][:2]
        logits = forward.prefill(tokens[1, :45], 1, start=2 * BLOCK_SIZE)
        assert (logits - reference_logits(tiny_model, tokens[1, :45])).abs().max() < TOL
        for pos in range(45, 60):
            logits = forward.decode(
                torch.tensor([1]), tokens[1, pos : pos + 1], torch.tensor([pos])
            )
            expected = reference_logits(tiny_model, tokens[1, : pos + 1])
            assert (logits[0] - expected).abs().max() < TOL, pos


SYSTEM = "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n"


def test_requests_sharing_a_system_prompt_get_the_tokens_they_get_unshared(loaded):
    prompts = [SYSTEM + "    def norm", SYSTEM + "    def __repr__", SYSTEM + "#"]
    alone = []
    for prompt in prompts:  # a fresh engine each: nothing to share
        engine = create_engine(loaded.model, loaded.tokenizer, slots=1, max_len=64)
        alone.append(engine.generate([prompt], GREEDY)[0].output_ids)
    engine = create_engine(loaded.model, loaded.tokenizer, slots=2, max_len=64)
    shared = engine.generate(prompts, GREEDY)
    assert [r.output_ids for r in shared] == alone
    system_tokens = len(loaded.tokenizer.encode(SYSTEM))
    assert engine.stats.cached_prompt_tokens >= 2 * (system_tokens // BLOCK_SIZE) * BLOCK_SIZE > 0


def test_a_pool_too_small_for_the_load_queues_requests_and_completes_them_all(loaded):
    """Room for two 14-position requests at a time (2 blocks) on 4 slots: six requests wait
    their turn, and each gets the tokens it gets alone."""
    block = kv_block_bytes(loaded.model)
    engine = create_engine(
        loaded.model, loaded.tokenizer, slots=4, max_len=64, kv_cache_bytes=2 * block
    )
    prompts = [[1, 10 + i, 20 + i] for i in range(6)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)  # 14 positions: 1 block
    requests = [engine.submit(p, params) for p in prompts]
    most_running = 0
    while engine.has_work():
        engine.step()
        most_running = max(most_running, engine.running)
        assert engine.running + engine.waiting + sum(r.done.is_set() for r in requests) == 6
    assert most_running == 2
    for prompt, request in zip(prompts, requests):
        single = create_engine(loaded.model, loaded.tokenizer, slots=1, max_len=64)
        assert request.output_ids == single.generate([prompt], params)[0].output_ids
    with pytest.raises(ValueError, match="needs more KV cache than the whole cache holds"):
        engine.submit([1, 2, 3], SamplingParams(max_new_tokens=60))

"""A failing model step fails only the requests in it; the engine frees their blocks and goes on."""
from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams
from kvserve.core.engine.llm_engine import FAULT_TOKEN_ENV, EngineStepError

FAULT = 300


def test_failed_step_aborts_its_requests_and_engine_recovers(tiny_model, monkeypatch):
    monkeypatch.setenv(FAULT_TOKEN_ENV, str(FAULT))
    llm = LLM(tiny_model("llama-tied-gqa"), dtype="float32", kv_cache_memory="8MiB", max_model_len=128,
              max_num_seqs=2)
    engine, params = llm.llm_engine, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = llm.generate([[4, 5, 6]], params, use_tqdm=False)[0].outputs[0].token_ids
    alone_c = llm.generate([[13, 14]], params, use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("a", [7, 8, 9], params)
    engine.step()
    engine.add_request("poisoned", list(range(20, 40)) + [FAULT], params)   # fills a block, named when scheduled
    engine.add_request("c", [13, 14], params)            # waits: max_num_seqs=2 is full, so not in the step
    with pytest.raises(EngineStepError, match=r"requests \['a', 'poisoned'\]: RuntimeError: injected fault") as err:
        engine.step()
    assert err.value.request_ids == ["a", "poisoned"]
    assert set(engine.requests) == {"c"}
    assert not engine.block_manager.cached, "blocks of a failed step must not be reused"
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [(o.request_id, o.outputs[0].token_ids) for o in finished] == [("c", alone_c)]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert llm.generate([[4, 5, 6]], params, use_tqdm=False)[0].outputs[0].token_ids == expected

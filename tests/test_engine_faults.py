"""A failing model step fails only the requests in it; the engine frees their blocks and goes on."""
from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams
from kvserve.core.engine.llm_engine import EngineStepError


def test_failed_step_aborts_its_requests_and_engine_recovers(tiny_model):
    llm = LLM(tiny_model("llama-tied-gqa"), dtype="float32", kv_cache_memory="8MiB", max_model_len=128)
    engine, params = llm.llm_engine, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = llm.generate([[4, 5, 6]], params, use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("a", [7, 8, 9], params)
    engine.add_request("b", [10, 11], SamplingParams(n=2, temperature=1.0, max_tokens=8))
    engine.step()

    real_execute = engine.runner.execute

    def fail_once(batch):   # the fault: one model step raises
        engine.runner.execute = real_execute
        raise RuntimeError("device fell over")

    engine.runner.execute = fail_once
    with pytest.raises(EngineStepError, match=r"requests \['a', 'b'\]: RuntimeError: device fell over") as err:
        engine.step()
    assert err.value.request_ids == ["a", "b"]
    assert not engine.has_unfinished_requests() and not engine.requests
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.block_manager.num_reserved == 0
    assert llm.generate([[4, 5, 6]], params, use_tqdm=False)[0].outputs[0].token_ids == expected

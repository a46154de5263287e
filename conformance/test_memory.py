"""Memory reporting: platform_memory_info's figures and the KV cache budget platform_update_config sets."""
from __future__ import annotations

from kvserve.core.config import build_engine_config


def test_memory_info_is_sane(platform):
    info = platform.memory_info()
    assert info.total_bytes > 0, info
    assert 0 <= info.free_bytes <= info.total_bytes, info


def test_update_config_sets_a_kv_cache_budget_within_free_memory(platform, tiny_llama):
    config = build_engine_config(tiny_llama, device=platform.name)
    platform.update_config(config)
    budget = config.cache.kv_cache_memory
    assert isinstance(budget, int) and budget > 0, f"platform_update_config left kv_cache_memory={budget!r}"
    assert budget <= platform.memory_info().free_bytes, f"a KV cache of {budget} bytes does not fit in free memory"


def test_a_budget_the_user_sets_is_kept(platform, tiny_llama):
    config = build_engine_config(tiny_llama, device=platform.name, kv_cache_memory="8MiB")
    platform.update_config(config)
    assert config.cache.kv_cache_memory == 8 << 20

"""The selected platform and the tiny checkpoint the conformance checks share."""
from __future__ import annotations

import pytest
import torch

from kvserve.conformance.plugin import OPTION

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def platform_name(request) -> str:
    name = request.config.getoption(OPTION)
    if name is None:
        pytest.skip(f"no platform chosen: run with {OPTION} NAME")
    return name


@pytest.fixture(scope="session")
def platform(platform_name):
    """The platform under test, bound to device 0 of this machine as an engine binds it."""
    from kvserve.plugins.manager import PluginManager

    try:
        selected = PluginManager().select_platform(platform_name)
        selected.bind_device(0)
    except ValueError as exc:
        pytest.exit(f"kvserve conformance: {exc}", returncode=4)
    return selected


@pytest.fixture(params=list(FLOAT_DTYPES))
def dtype(request, platform) -> torch.dtype:
    """Each float dtype the platform lists as supported."""
    dtype = FLOAT_DTYPES[request.param]
    if dtype not in platform.info.supported_dtypes:
        pytest.skip(f"platform {platform.name!r} does not list {request.param} among its supported dtypes")
    return dtype


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from kvserve.conformance.tiny_model import save_tiny_model

    return save_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))

"""The kvserve command, run as a user runs it."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

pytestmark = pytest.mark.slow


def kvserve(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["kvserve", *args], input=stdin, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def engine_args(tiny_model) -> list[str]:
    return ["--model", tiny_model("llama-tied-gqa"), "--dtype", "float32", "--kv-cache-memory", "8MiB"]


def test_generate_prints_each_completion(engine_args):
    result = kvserve("generate", "Once upon a time", "The quick brown fox", "--max-tokens", "12", *engine_args)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip("\n").split("\n")) >= 2
    assert "KV cache" in result.stderr


def test_start_up_announces_its_slow_stages(engine_args):
    # Every stage counts as slow here: each says what it does, then how long it took.
    result = subprocess.run(["kvserve", "generate", "Once upon a time", "--max-tokens", "2", *engine_args],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KVSERVE_STAGE_LOG_AFTER": "0"})
    assert result.returncode == 0, result.stderr
    for stage in ("building the CPU kernels", "reading the weights", "preparing the weights for the platform"):
        assert re.search(f"{stage}.* \\.\\.\\.\n", result.stderr), result.stderr
        assert re.search(f"{stage}.*: done in \\d+\\.\\ds\n", result.stderr), result.stderr
    assert "reading weights:" in result.stderr   # the progress bar
    quiet = kvserve("generate", "Once upon a time", "--max-tokens", "2", *engine_args)
    assert "reading the weights" not in quiet.stderr   # fast stages stay silent by default


def test_generate_on_default_model():
    result = kvserve("generate", "The capital of France is", "--max-tokens", "8", "--max-model-len", "256")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chat_keeps_the_conversation():
    # float32: in bfloat16, "The" and "L'" start the first reply within rounding of each other (0.08 apart in
    # float32); this test is about the conversation, not about which rounding wins.
    result = kvserve("chat", "--max-tokens", "24", "--max-model-len", "1024", "--dtype", "float32",
                     stdin="What is the capital of France?\nAnd of Italy?\n")
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.split("\n") if line.strip()]
    assert "Paris" in replies[0] and any("Rome" in r for r in replies[1:])


def test_bad_option_is_a_clear_error(engine_args):
    result = kvserve("generate", "hi", "--temperature", "-1", *engine_args)
    assert result.returncode == 2
    assert "temperature must be a finite number >= 0" in result.stderr


def test_speculative_config_is_json(engine_args):
    ngram = '{"method": "ngram", "num_speculative_tokens": 3}'
    result = kvserve("generate", "a b c a b c a b", "--max-tokens", "8", "--speculative-config", ngram, *engine_args)
    assert result.returncode == 0, result.stderr
    result = kvserve("generate", "hi", "--speculative-config", "{method: ngram}", *engine_args)
    assert result.returncode == 2
    assert "--speculative-config: not valid JSON" in result.stderr
    result = kvserve("generate", "hi", "--speculative-config", '{"method": "eagle3", "num_speculative_tokens": 3}',
                     *engine_args)
    assert result.returncode == 2
    assert ("speculative_config method 'eagle3' is not supported yet; supported: 'ngram', 'draft_model', 'medusa', "
            "'eagle'") in result.stderr

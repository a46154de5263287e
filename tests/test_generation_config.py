"""The model's generation_config.json supplies default sampling parameters, offline and in the server, where a
request does not set them; generation_config='none' keeps kvserve's own, a folder gives another file's."""
from __future__ import annotations

import json
import shutil

import pytest
from server_utils import openai_client, start_server, stop_server

from kvserve import LLM, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9], [42, 43]]
DEFAULTS = {"temperature": 0.0, "repetition_penalty": 1.3, "max_new_tokens": 6, "do_sample": True}
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def with_generation_config(tiny_model, folder, values: dict) -> str:
    path = shutil.copytree(tiny_model("llama-tied-gqa"), folder)
    (path / "generation_config.json").write_text(json.dumps(values))
    return str(path)


def tiny_llm(path: str, **options) -> LLM:
    return LLM(path, dtype="float32", kv_cache_memory="8MiB", max_model_len=256, **options)


def test_generate_without_params_takes_the_model_s_defaults(tiny_model, tmp_path):
    llm = tiny_llm(with_generation_config(tiny_model, tmp_path / "model", DEFAULTS))
    expected = SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=6)
    assert llm.get_default_sampling_params() == expected
    by_default = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, use_tqdm=False)]
    assert by_default == [o.outputs[0].token_ids for o in llm.generate(PROMPTS, expected, use_tqdm=False)]


def test_none_keeps_kvserve_s_defaults_and_a_folder_gives_its_own(tiny_model, tmp_path):
    path = with_generation_config(tiny_model, tmp_path / "model", DEFAULTS)
    assert tiny_llm(path, generation_config="none").get_default_sampling_params() == SamplingParams()
    assert tiny_llm(path, generation_config="vllm").get_default_sampling_params() == SamplingParams()
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"top_k": 3, "top_p": 0.5, "min_p": 0.1}))
    assert tiny_llm(path, generation_config=str(other)).get_default_sampling_params() == SamplingParams(
        top_k=3, top_p=0.5, min_p=0.1)


def test_bad_settings_and_files_are_clear_errors(tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"^generation_config must be auto, none, vllm or a folder holding a "
                                         r"generation_config.json, got 'greedy'"):
        tiny_llm(tiny_model("llama-tied-gqa"), generation_config="greedy")
    path = with_generation_config(tiny_model, tmp_path / "model", {"temperature": -1.0})
    with pytest.raises(ValueError, match=r"generation_config.json sets a default that kvserve cannot sample with: "
                                         r".*temperature.*generation_config='none'"):
        tiny_llm(path)
    assert tiny_llm(path, generation_config="none").get_default_sampling_params() == SamplingParams()


@pytest.mark.slow
def test_the_server_fills_what_a_request_leaves_out(tiny_model, tmp_path):
    path = with_generation_config(tiny_model, tmp_path / "model", DEFAULTS)
    server = start_server([path, "--dtype", "float32", "--kv-cache-memory", "8MiB", "--max-model-len", "256",
                           "--chat-template", TEMPLATE])
    try:
        client = openai_client(server)
        messages = [{"role": "user", "content": "hello there"}]
        name = client.models.list().data[0].id
        chat = client.chat.completions.create(model=name, messages=messages)
        explicit = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=6,
                                                  extra_body={"repetition_penalty": 1.3})
        assert chat.choices[0].message.content == explicit.choices[0].message.content
        assert chat.usage.completion_tokens == explicit.usage.completion_tokens <= 6
        shorter = client.chat.completions.create(model=name, messages=messages, max_tokens=2)
        assert shorter.usage.completion_tokens <= 2
        assert explicit.choices[0].message.content.startswith(shorter.choices[0].message.content)
        completion = client.completions.create(model=name, prompt="hello there", max_tokens=6)
        explicit = client.completions.create(model=name, prompt="hello there", max_tokens=6, temperature=0,
                                             extra_body={"repetition_penalty": 1.3})
        assert completion.choices[0].text == explicit.choices[0].text
    finally:
        stop_server(server)

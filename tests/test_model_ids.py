"""Models as users download them: ids resolved through a Hugging Face cache (a fake one, in huggingface_hub's layout:
models--ORG--NAME/refs/<branch or tag> naming a commit, snapshots/<commit>/ linking the files), sharded and
pickled checkpoint folders, and vLLM's keywords, each honoured or refused with its reason."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from kvserve import LLM, SamplingParams
from kvserve.core.config import ModelConfig, build_engine_config
from kvserve.core.loader import hub
from kvserve.core.loader.model_loader import Checkpoint
from kvserve.core.vllm_keywords import VLLM_KEYWORDS

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = ["The quick brown fox", "Once upon a time"]
ENGINE = dict(dtype="float32", kv_cache_memory="8MiB")
CUSTOM_CONFIG = """from transformers import LlamaConfig


class CustomLlamaConfig(LlamaConfig):
    model_type = "kvserve_custom_llama"
"""


def add_snapshot(cache: Path, repo_id: str, files: dict[str, Path], refs: tuple[str, ...] = ("main",)) -> str:
    """A commit of ``repo_id`` in the cache: its files linked under snapshots/<commit>/, and refs/<ref> naming it."""
    commit = hashlib.sha1(f"{repo_id}:{refs}".encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        (snapshot / name).symlink_to(source)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return commit


def folder_files(folder: str) -> dict[str, Path]:
    return {path.name: path for path in Path(folder).iterdir()}


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_model, smollm2_path) -> Path:
    """HF_HOME, whose hub/ holds kvserve-tests/tiny (main: a Llama; tag v1: a Qwen2), a Llama whose config needs
    its own code, and a GGUF repo of two quant types."""
    home = tmp_path_factory.mktemp("hf_home")
    cache = home / "hub"
    llama, qwen2 = folder_files(tiny_model("llama-tied-gqa")), folder_files(tiny_model("qwen2"))
    add_snapshot(cache, "kvserve-tests/tiny", llama)
    add_snapshot(cache, "kvserve-tests/tiny", qwen2, refs=("v1",))
    custom = home / "custom"
    custom.mkdir()
    config = json.loads(llama["config.json"].read_text())
    config.update(model_type="kvserve_custom_llama", auto_map={"AutoConfig": "configuration_custom.CustomLlamaConfig"})
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "configuration_custom.py").write_text(CUSTOM_CONFIG)
    add_snapshot(cache, "kvserve-tests/tiny-remote-code", {**llama, **folder_files(str(custom))})
    add_snapshot(cache, "kvserve-tests/smollm2-gguf", {"SmolLM2-135M-Instruct.Q4_1.gguf": Path(smollm2_path),
                                                        "SmolLM2-135M-Instruct.Q8_0.gguf": Path(smollm2_path)})
    return home


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, as huggingface_hub reads it when it is imported: no test here asks the network."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def greedy(model: str, **options) -> list[list[int]]:
    outputs = LLM(model, **ENGINE, **options).generate(PROMPTS, GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def opened(model: str, **options) -> Checkpoint:
    return Checkpoint.open(ModelConfig(model=model, **options))


def test_an_id_runs_from_the_cache_as_its_folder_does(hf_home, tiny_model):
    assert greedy("kvserve-tests/tiny", download_dir=str(hf_home / "hub")) == greedy(tiny_model("llama-tied-gqa"))


def test_revision_chooses_a_branch_tag_or_commit(hf_home):
    cache = str(hf_home / "hub")
    assert opened("kvserve-tests/tiny", download_dir=cache).hf_config.architectures == ["LlamaForCausalLM"]
    v1 = opened("kvserve-tests/tiny", download_dir=cache, revision="v1")
    assert v1.hf_config.architectures == ["Qwen2ForCausalLM"]
    commit = Path(v1.path).name
    assert opened("kvserve-tests/tiny", download_dir=cache, revision=commit).path == v1.path
    with pytest.raises(ValueError, match="'kvserve-tests/tiny' at revision 'v2' is not in the Hugging Face cache"):
        opened("kvserve-tests/tiny", download_dir=cache, revision="v2")
    with pytest.raises(ValueError, match="at revision 'nope' is not in"):
        LLM("kvserve-tests/tiny", download_dir=cache, tokenizer_revision="nope", **ENGINE)


def test_a_draft_model_id_resolves_at_its_revision_in_the_engine_s_download_dir(hf_home, tiny_model):
    cache = str(hf_home / "hub")
    def draft(revision: str) -> dict:
        return {"method": "draft_model", "model": "kvserve-tests/tiny", "revision": revision,
                "num_speculative_tokens": 2}
    target = tiny_model("llama-tied-gqa")
    assert greedy(target, download_dir=cache, speculative_config=draft("v1")) == greedy(target)
    with pytest.raises(ValueError, match=re.escape(f"'kvserve-tests/tiny' at revision 'v2' is not in the Hugging "
                                                   f"Face cache '{cache}'")):
        LLM(target, download_dir=cache, speculative_config=draft("v2"), **ENGINE)
    with pytest.raises(ValueError, match="speculative_config revision must be a branch, tag or commit"):
        LLM(target, speculative_config=draft(1), **ENGINE)


def test_a_missing_id_is_a_quick_error_naming_it_and_the_cache(hf_home):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(
            f"model 'kvserve-tests/missing' is no local path, and model id 'kvserve-tests/missing' at revision 'main' "
            f"is not in the Hugging Face cache '{hf_home}/hub'; downloading it failed: OfflineModeIsEnabled")):
        LLM("kvserve-tests/missing", download_dir=str(hf_home / "hub"))
    assert time.perf_counter() - start < 5
    with pytest.raises(ValueError, match="neither a Hugging Face model folder nor a .gguf file, nor a model id"):
        LLM("/no/such/folder")


def test_a_local_path_wins_over_an_id(hf_home, tiny_model, tmp_path, monkeypatch):
    shutil.copytree(tiny_model("qwen2"), tmp_path / "kvserve-tests" / "tiny")
    monkeypatch.chdir(tmp_path)
    checkpoint = opened("kvserve-tests/tiny", download_dir=str(hf_home / "hub"))
    assert checkpoint.path == "kvserve-tests/tiny" and checkpoint.hf_config.architectures == ["Qwen2ForCausalLM"]


def test_a_gguf_repo_s_file_by_quant_suffix_or_gguf_file(hf_home):
    cache, repo = str(hf_home / "hub"), "kvserve-tests/smollm2-gguf"
    checkpoint = opened(f"{repo}:q4_1", download_dir=cache)
    assert checkpoint.is_gguf and checkpoint.path.endswith("/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert checkpoint.hf_config.architectures == ["LlamaForCausalLM"]
    chosen = hub.resolve(repo, download_dir=cache, gguf_file="SmolLM2-135M-Instruct.Q8_0.gguf")
    assert chosen == str(Path(checkpoint.path).with_name("SmolLM2-135M-Instruct.Q8_0.gguf"))
    files = "its .gguf files: SmolLM2-135M-Instruct.Q4_1.gguf, SmolLM2-135M-Instruct.Q8_0.gguf"
    with pytest.raises(ValueError, match=f"has no .gguf files of Q4: choose one .*; {files}"):
        opened(f"{repo}:Q4", download_dir=cache)   # a quant type is matched whole: Q4 is not Q4_1
    with pytest.raises(ValueError, match=f"has no config.json but 2 .gguf files: choose one with {repo}:QUANT"):
        opened(repo, download_dir=cache)
    with pytest.raises(ValueError, match="chooses its .gguf file by its :Q4_1 suffix, and gguf_file="):
        opened(f"{repo}:Q4_1", download_dir=cache, gguf_file="SmolLM2-135M-Instruct.Q8_0.gguf")


def test_trust_remote_code_runs_a_model_s_own_config_class(hf_home, tiny_model):
    cache = str(hf_home / "hub")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        LLM("kvserve-tests/tiny-remote-code", download_dir=cache, **ENGINE)
    checkpoint = opened("kvserve-tests/tiny-remote-code", download_dir=cache, trust_remote_code=True)
    assert type(checkpoint.hf_config).__name__ == "CustomLlamaConfig"
    assert (greedy("kvserve-tests/tiny-remote-code", download_dir=cache, trust_remote_code=True)
            == greedy(tiny_model("llama-tied-gqa")))


def test_indexed_shards_load_and_a_consolidated_file_beside_them_does_not(tiny_model, tmp_path):
    source = tiny_model("llama-untied-llama3-rope")
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(tmp_path, max_shard_size="100KB")
    for file in Path(source).glob("tokenizer*"):
        shutil.copy(file, tmp_path)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert (tmp_path / "model.safetensors.index.json").is_file()
    save_file({"bogus.weight": torch.zeros(1)}, tmp_path / "consolidated.safetensors")   # read, it would fail
    assert greedy(str(tmp_path)) == greedy(source)


def test_pytorch_pickles_load_alone_or_through_their_index(tiny_model, tmp_path):
    source = tiny_model("llama-untied-llama3-rope")
    state = AutoModelForCausalLM.from_pretrained(source).state_dict()
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    for folder in (single, sharded):
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(state, single / "pytorch_model.bin")
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, shard in shards.items():
        torch.save({name: state[name] for name in shard}, sharded / file)
    weight_map = {name: file for file, shard in shards.items() for name in shard}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.save({"bogus.weight": torch.zeros(1)}, sharded / "pytorch_model-stray.bin")   # no index names it
    expected = greedy(source)
    assert greedy(str(single)) == expected and greedy(str(sharded)) == expected


@pytest.mark.parametrize("name", sorted(VLLM_KEYWORDS))
def test_a_vllm_keyword_without_a_kvserve_option_is_refused_with_its_reason(name):
    allowed, why = VLLM_KEYWORDS[name]
    with pytest.raises(ValueError, match=f"^{name}='other' is vLLM's, and kvserve .*: {re.escape(why)}$"):
        build_engine_config(None, **{name: "other"})
    for value in allowed:   # what kvserve does anyway
        build_engine_config(None, **{name: value})


def test_vllm_keywords_reach_llm_as_value_errors(tiny_model):
    path = tiny_model("llama-tied-gqa")
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.9 is vLLM's, and kvserve has no such option: "
                                         "kvserve sizes the KV cache in bytes.*set kv_cache_memory"):
        LLM(path, gpu_memory_utilization=0.9)
    with pytest.raises(ValueError, match="enable_sleep_mode=True is vLLM's, and kvserve takes only False"):
        LLM(path, enable_sleep_mode=True)
    for mode in ("slow", "mistral"):
        with pytest.raises(ValueError, match=f"tokenizer_mode must be one of auto, hf, got '{mode}': "):
            LLM(path, tokenizer_mode=mode)
    llm = LLM(path, tokenizer_mode="hf", disable_log_stats=True, enable_sleep_mode=False, seed=3, **ENGINE)
    assert llm.llm_engine.config.model.seed == 3


def run_cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return subprocess.run([sys.executable, "-m", "kvserve.core.entrypoints.cli", *args], capture_output=True,
                          text=True, timeout=300, env={**environment, **env})


def test_the_command_line_resolves_an_id_through_hf_home(hf_home, tiny_model):
    args = ["--max-tokens", "8", "--dtype", "float32", "--kv-cache-memory", "8MiB"]
    result = run_cli(["generate", PROMPTS[0], "--model", "kvserve-tests/tiny", *args], HF_HOME=str(hf_home),
                     HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    expected = LLM(tiny_model("llama-tied-gqa"), **ENGINE).generate(
        PROMPTS[0], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert result.stdout == expected[0].outputs[0].text + "\n"


def test_a_hub_that_never_answers_fails_within_its_timeout(hf_home):
    with socket.socket() as silent:   # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.perf_counter()
        result = run_cli(["generate", "x", "--model", "kvserve-tests/missing"], HF_HUB_CACHE=str(hf_home / "hub"),
                         HF_ENDPOINT=f"http://127.0.0.1:{silent.getsockname()[1]}", HF_HUB_ETAG_TIMEOUT="2")
    assert result.returncode == 2, result.stderr
    assert (f"error: model 'kvserve-tests/missing' is no local path, and model id 'kvserve-tests/missing' at revision "
            f"'main' is not in the Hugging Face cache '{hf_home}/hub'; downloading it failed: ReadTimeout"
            in result.stderr)
    assert time.perf_counter() - start < 60   # the import and the 2 s timeout, not a hang

"""Engine and server options are declared once: the docs' tables, every command's flags and LLM's keywords come
from the config classes, and the defaults give way where an unset one would conflict."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvserve import LLM
from kvserve.core.config import build_engine_config, engine_options
from kvserve.core.options import class_options
from kvserve.core.entrypoints.cli import build_parser
from kvserve.core.entrypoints.engine_args import options_table
from kvserve.core.entrypoints.openai.limits import ServerLimits
from kvserve.core.entrypoints.openai.server_options import ServerOptions, options_from

DOC = Path(__file__).resolve().parents[1] / "docs" / "options.md"
SERVER_OPTIONS = class_options(ServerOptions) + class_options(ServerLimits)
ENGINE_COMMANDS = (["generate", "x"], ["chat"], ["serve"], ["bench", "throughput"], ["bench", "latency"])


def test_the_docs_tables_are_the_code_s():
    text = DOC.read_text()
    assert options_table(engine_options().values()) in text
    assert options_table(SERVER_OPTIONS) in text
    documented = set(re.findall(r"^\| `(\w+)` \|", text, re.MULTILINE))
    assert documented == set(engine_options()) | {o.name for o in SERVER_OPTIONS}


def test_option_rows_on_topic_pages_are_the_code_s():
    rows = set(options_table(list(engine_options().values()) + SERVER_OPTIONS).splitlines()[2:])
    copied = [(page.name, line) for page in DOC.parent.glob("*.md") for line in page.read_text().splitlines()
              if re.match(r"\| `\w+` \| `--", line)]
    assert len(copied) > len(rows)   # the topic pages copy rows
    assert [(page, line) for page, line in copied if line not in rows] == []


@pytest.mark.parametrize("command", ENGINE_COMMANDS, ids=" ".join)
def test_every_engine_command_takes_every_engine_option(command):
    args = build_parser().parse_args(command)
    assert {name for name in engine_options()} <= set(vars(args))
    defaults = {name: getattr(args, name) for name in engine_options()}
    assert defaults == {name: option.field.default for name, option in engine_options().items()}


def test_flags_read_each_option_s_type_and_choices():
    args = build_parser().parse_args(
        ["serve", "--dtype", "half", "--max-num-seqs", "4", "--swap-space", "512MiB", "--no-enable-prefix-caching",
         "-tp", "2", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}',
         "--structured-outputs-compile-timeout", "2.5", "--max-prompt-chars", "100", "--trust-request-chat-template"])
    assert (args.dtype, args.max_num_seqs, args.swap_space, args.enable_prefix_caching) == ("half", 4, "512MiB", False)
    assert args.tensor_parallel_size == 2 and args.speculative_config["num_speculative_tokens"] == 2
    assert (args.structured_outputs_compile_timeout, args.max_prompt_chars) == (2.5, 100)
    assert args.trust_request_chat_template is True
    for wrong in (["--dtype", "float8"], ["--kv-cache-dtype", "int3"], ["--max-num-seqs", "many"],
                  ["--speculative-config", "[1]"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", *wrong])


def test_server_options_read_their_flags_and_check_their_values():
    args = build_parser().parse_args(["serve", "--served-model-name", "a", "b", "--port", "9000",
                                      "--enable-auto-tool-choice", "--max-prompts-per-request", "3"])
    server, limits = options_from(ServerOptions, args), options_from(ServerLimits, args)
    assert (server.served_model_name, server.port, server.enable_auto_tool_choice) == (["a", "b"], 9000, True)
    assert (server.host, server.api_key, limits.max_prompts_per_request) == ("127.0.0.1", None, 3)
    with pytest.raises(ValueError, match=r"port must be in \[0, 65535\], got 70000"):
        options_from(ServerOptions, build_parser().parse_args(["serve", "--port", "70000"]))


def test_unknown_keywords_are_refused_with_the_allowed_ones():
    with pytest.raises(TypeError, match="unknown engine option max_num_seq; allowed: .*max_num_seqs"):
        LLM(max_num_seq=4)
    with pytest.raises(TypeError, match="unknown engine options colour, max_num_seq; allowed: "):
        build_engine_config(None, max_num_seq=4, colour="red")


def test_the_default_max_num_seqs_follows_a_smaller_step_budget():
    assert build_engine_config(None).scheduler.max_num_seqs == 128
    assert build_engine_config(None, max_num_batched_tokens=64).scheduler.max_num_seqs == 64
    config = build_engine_config(None, max_num_batched_tokens=64, max_num_seqs=128)
    with pytest.raises(ValueError, match="max_num_batched_tokens=64 must be >= max_num_seqs=128"):
        config.finalize(2048)


def test_the_default_max_model_len_fits_a_small_kv_cache(tiny_model, caplog):
    path = tiny_model("llama-tied-gqa")
    llm = LLM(path, dtype="float32", num_gpu_blocks_override=4, block_size=16, max_num_batched_tokens=64)
    assert llm.llm_engine.max_model_len == 64 and llm.llm_engine.inputs.max_model_len == 64
    assert "max_model_len is 64, not the model's" in caplog.text
    with pytest.raises(ValueError, match=r"fewer than a sequence may hold \(128 tokens, for max_model_len=128\)"):
        LLM(path, dtype="float32", num_gpu_blocks_override=4, block_size=16, max_model_len=128)

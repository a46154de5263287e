"""LoRA adapters on the server: --lora-modules, adapters in /v1/models as models of their own, chosen by the
request's model, and loaded and unloaded at run time behind the API key; driven by the official openai client."""
from __future__ import annotations

import httpx
import openai
import pytest
import torch
from lora_adapters import ALL_PROJECTIONS, save_adapter
from server_utils import start_server, stop_server, tiny_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvserve.conformance.tiny_model import hf_greedy
from kvserve.core.entrypoints.cli import main
from kvserve.core.entrypoints.openai.server_options import ServerOptions

pytestmark = pytest.mark.slow

KEY = "lora-key"
PROMPT = "Once upon a time"
TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"   # the prompt as it is
GREEDY = {"temperature": 0, "max_tokens": 10, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """A server with adapter a1 from the start, and adapter a2 to load later; each adapter's expected text."""
    base = tiny_model("llama-tied-gqa")
    root = tmp_path_factory.mktemp("served-adapters")
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt = tokenizer(PROMPT)["input_ids"]
    texts = {None: AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)}
    paths = {}
    for lora_id, targets in ((1, ALL_PROJECTIONS), (2, ["q_proj", "v_proj", "down_proj"])):
        paths[f"a{lora_id}"], texts[f"a{lora_id}"] = save_adapter(base, str(root / f"a{lora_id}"), lora_id, targets)
    texts = {name: tokenizer.decode(hf_greedy(model, [prompt], 10)[0]) for name, model in texts.items()}
    server = start_server(tiny_args(tiny_model, "--enable-lora", "--max-loras", "2", "--lora-modules",
                                    f"a1={paths['a1']}", "--api-key", KEY, "--chat-template", TEMPLATE))
    yield server, base, paths, texts
    stop_server(server)


def post(server, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)


def test_adapters_are_models_of_their_own_loaded_and_unloaded_at_run_time(served):
    server, base, paths, texts = served
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)
    cards = client.models.list().data
    assert [(m.id, m.model_extra["parent"]) for m in cards] == [(base, None), ("a1", base)]
    for model, expected in ((base, texts[None]), ("a1", texts["a1"])):
        assert client.completions.create(model=model, prompt=PROMPT, **GREEDY).choices[0].text == expected
    assert texts["a1"] != texts[None]

    assert post(server, "/v1/load_lora_adapter", {"lora_name": "a2", "lora_path": paths["a2"]}, key=None) \
        .status_code == 401
    loaded = post(server, "/v1/load_lora_adapter", {"lora_name": "a2", "lora_path": paths["a2"]})
    assert (loaded.status_code, loaded.text) == (200, "Success: LoRA adapter 'a2' added successfully.")
    assert [m.id for m in client.models.list().data] == [base, "a1", "a2"]
    replies = [client.completions.create(model=model, prompt=PROMPT, **GREEDY) for model in ("a2", "a1", base)]
    assert [r.choices[0].text for r in replies] == [texts["a2"], texts["a1"], texts[None]]
    chat = client.chat.completions.create(model="a2", messages=[{"role": "user", "content": PROMPT}], **GREEDY)
    assert (chat.model, chat.choices[0].message.content) == ("a2", texts["a2"])

    unloaded = post(server, "/v1/unload_lora_adapter", {"lora_name": "a2"})
    assert (unloaded.status_code, unloaded.text) == (200, "Success: LoRA adapter 'a2' removed successfully.")
    with pytest.raises(openai.NotFoundError, match="The model `a2` does not exist"):
        client.completions.create(model="a2", prompt=PROMPT, **GREEDY)
    assert client.completions.create(model="a1", prompt=PROMPT, **GREEDY).choices[0].text == texts["a1"]


def test_bad_adapter_requests_are_refused_and_the_server_goes_on(served, tmp_path):
    server, base, paths, texts = served
    cases = [("/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": paths["a2"]}, 400, "served already"),
             ("/v1/load_lora_adapter", {"lora_name": base, "lora_path": paths["a2"]}, 400, "served already"),
             ("/v1/load_lora_adapter", {"lora_name": "gone", "lora_path": str(tmp_path / "none")}, 400,
              "no such folder"),
             ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": paths["a2"], "rank": 1}, 400, "rank"),
             ("/v1/unload_lora_adapter", {"lora_name": "never"}, 404, "no LoRA adapter named 'never'"),
             ("/v1/unload_lora_adapter", {"lora_name": base}, 404, "no LoRA adapter named")]
    for path, body, status, words in cases:
        response = post(server, path, body)
        assert response.status_code == status and words in response.json()["error"]["message"], response.text
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)
    assert client.completions.create(model="a1", prompt=PROMPT, **GREEDY).choices[0].text == texts["a1"]


def test_lora_modules_are_name_path_pairs_and_need_enable_lora(capsys):
    assert ServerOptions(lora_modules=["sql=/adapters/a=b"]).lora_adapters() == {"sql": "/adapters/a=b"}
    with pytest.raises(ValueError, match="lora_modules must each be NAME=PATH, got 'sql', '=x'"):
        ServerOptions(lora_modules=["sql", "=x", "ok=y"])
    with pytest.raises(ValueError, match="lora_modules names each adapter once, got a, a"):
        ServerOptions(lora_modules=["a=x", "a=y"])
    assert main(["serve", "--lora-modules", "a=x"]) == 2
    assert "error: --lora-modules needs --enable-lora" in capsys.readouterr().err

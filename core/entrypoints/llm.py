"""The offline API, with vLLM's names: ``LLM(...).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

from itertools import count
from typing import Sequence as Seq

from tqdm import tqdm

from kvserve.core.config import build_engine_config
from kvserve.core.engine.data_parallel import make_engine
from kvserve.core.log import init_logging
from kvserve.core.lora.request import LoRARequest
from kvserve.core.outputs import BeamSearchOutput, BeamSearchSequence, EmbeddingRequestOutput, RequestOutput
from kvserve.core.pooling_params import PoolingParams
from kvserve.core.sampling_params import BeamSearchParams, SamplingParams

Prompt = str | list[int] | dict


class LLM:
    def __init__(self, model: str | None = None, **engine_options):
        """Load ``model`` (a HF folder, a .gguf file, or a model id ORG/NAME[:QUANT] found in or downloaded to the
        Hugging Face cache; None: the default model). ``engine_options`` are the engine options of docs/options.md,
        named as vLLM names them (dtype, max_model_len, revision, ...); a vLLM keyword that kvserve has no option
        for is a ValueError that says why. Ranks and data-parallel replicas are spawned processes that do not run
        the calling script again: a script needs no ``if __name__ == "__main__":`` guard, and one on standard
        input works too."""
        init_logging()
        self.llm_engine = make_engine(build_engine_config(model, **engine_options))
        self._request_ids = count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate and chat sample with when given no SamplingParams: the model's generation_config.json's
        defaults (see the generation_config option), else SamplingParams()'s."""
        return SamplingParams(**self.llm_engine.inputs.sampling_defaults)

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | Seq[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, {"prompt": text} or {"prompt_token_ids": [...]}), in
        input order; with ``lora_request``, one LoRA adapter for all of them or one each (None: the base model),
        on an engine started with enable_lora=True."""
        prompts = prompt_list(prompts)
        if isinstance(sampling_params, BeamSearchParams):
            raise TypeError("generate takes SamplingParams; for beam search call "
                            "LLM.beam_search(prompts, BeamSearchParams(...))")
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = one_each(sampling_params, SamplingParams, "sampling params", len(prompts))
        loras = [None] * len(prompts) if lora_request is None else one_each(lora_request, LoRARequest,
                                                                            "LoRA requests", len(prompts))
        return self._run(prompts, params, use_tqdm, loras)

    def embed(self, prompts: Prompt | Seq[Prompt], pooling_params: PoolingParams | Seq[PoolingParams] | None = None,
              use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        """The embedding of every prompt (as ``generate`` takes them), in input order, from a pooling model: an
        encoder such as BertModel, or any model loaded with runner='pooling'."""
        prompts = prompt_list(prompts)
        params = one_each(pooling_params or PoolingParams(), PoolingParams, "pooling params", len(prompts))
        return self._run(prompts, params, use_tqdm)

    def beam_search(self, prompts: Prompt | Seq[Prompt], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search from every prompt, in input order; each output holds the beam_width best sequences."""
        prompts = prompt_list(prompts)
        outputs = self._run(prompts, [params] * len(prompts), use_tqdm)
        return [BeamSearchOutput([BeamSearchSequence(o.prompt_token_ids + c.token_ids, c.cumulative_logprob, c.text,
                                                     c.finish_reason) for c in o.outputs]) for o in outputs]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             lora_request: LoRARequest | Seq[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and generate a reply (``lora_request`` as
        ``generate`` takes it)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, chat_template, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def apply_chat_template(self, conversation: list[dict], chat_template: str | None = None,
                            add_generation_prompt: bool = True) -> list[int]:
        return self.llm_engine.inputs.render_chat(conversation, chat_template, add_generation_prompt)

    def _run(self, prompts: list[str | list[int]], params: list[SamplingParams | BeamSearchParams | PoolingParams],
             use_tqdm: bool,
             loras: list[LoRARequest | None] | None = None) -> list[RequestOutput | EmbeddingRequestOutput]:
        engine = self.llm_engine
        loras = loras or [None] * len(prompts)
        token_ids = [engine.validate(p, sp) for p, sp in zip(prompts, params)]  # all checked before any starts
        for lora in dict.fromkeys(lora for lora in loras if lora is not None):
            engine.check_lora(lora)
        request_ids = [str(next(self._request_ids)) for _ in prompts]
        for request_id, prompt, param, prompt_ids, lora in zip(request_ids, prompts, params, token_ids, loras):
            engine.add_request(request_id, prompt, param, prompt_ids, lora)
        done: dict[str, RequestOutput] = {}
        pending = set(request_ids)
        with tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while pending:
                for output in engine.step():
                    if output.finished and output.request_id in pending:
                        done[output.request_id] = output
                        pending.discard(output.request_id)
                        bar.update(1)
        return [done[i] for i in request_ids]


def one_each(params, kind: type, name: str, count: int) -> list:
    """``params`` for each of ``count`` prompts: one ``kind`` for all of them, or a sequence of one each."""
    listed = [params] * count if isinstance(params, kind) else list(params)
    if len(listed) != count:
        raise ValueError(f"got {len(listed)} {name} for {count} prompts; give one or one each")
    return listed


def prompt_list(prompts: Prompt | Seq[Prompt]) -> list[str | list[int]]:
    """Prompts as text or token ids, from one prompt or many, each text, token ids, {"prompt": text} or
    {"prompt_token_ids": [...]} (vLLM's TextPrompt and TokensPrompt)."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    for p in prompts:
        if isinstance(p, dict) and not {"prompt", "prompt_token_ids"} & p.keys():
            raise ValueError(f"a prompt dict needs 'prompt' (text) or 'prompt_token_ids' (token ids), got keys "
                             f"{sorted(p)}")
    return [(p["prompt_token_ids"] if "prompt_token_ids" in p else p["prompt"]) if isinstance(p, dict) else p
            for p in prompts]

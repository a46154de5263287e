"""Turns a prompt and its sampling parameters into checked token ids, before any work starts."""
from __future__ import annotations

import jinja2

from kvserve.core.layers.pooler import PoolerConfig
from kvserve.core.pooling_params import PoolingParams
from kvserve.core.sampling_params import BeamSearchParams, SamplingParams
from kvserve.core.structured_outputs.manager import StructuredOutputManager


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, max_num_seqs: int,
                 grammars: StructuredOutputManager, chat_template: str | None = None,
                 sampling_defaults: dict | None = None, pooling: PoolerConfig | None = None):
        """``sampling_defaults``: the SamplingParams values that a request which does not set them gets (the
        model's generation_config.json's). ``pooling``: a pooling model's embeddings; None for a generative one."""
        self.pooling = pooling
        self.tokenizer = tokenizer
        self.sampling_defaults = sampling_defaults or {}
        self.grammars = grammars
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        # A fast tokenizer's first call may reset the truncation or padding its file sets, a change that fails
        # ("Already borrowed") while another thread encodes; made here, later calls only read it, and the server's
        # worker threads can share the tokenizer.
        tokenizer("")

    def render_chat(self, conversation: list[dict], chat_template: str | None = None,
                    add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
        """Token ids of a conversation through the chat template (the request's, the engine's, or the model's),
        which is given the declared ``tools`` too."""
        return self.chat_ids(self.chat_text(conversation, chat_template, add_generation_prompt, tools))

    def chat_text(self, conversation: list[dict], chat_template: str | None = None,
                  add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """The text of a conversation through the chat template, not yet tokenized."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this model has no chat template; pass chat_template=... (a Jinja template)")
        if not isinstance(conversation, list) or not conversation:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        for message in conversation:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"each chat message must be a dict with 'role' and 'content', got {message!r}")
        try:
            return self.tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, tools=tools)
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template cannot be rendered: {type(exc).__name__}: {exc}") from None

    def chat_ids(self, text: str) -> list[int]:
        """Token ids of a rendered chat: its special tokens come from the template, so none are added."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt, checked against the vocabulary and the context length, which keeps a token for
        the output unless the model pools."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"] if prompt else []
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
                raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        else:
            raise TypeError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty; give at least one character or token id")
        room = 0 if self.pooling is not None else 1
        if len(ids) > self.max_model_len - room:
            raise ValueError(f"prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len}: "
                             f"the prompt may have at most {self.max_model_len - room} tokens")
        return ids

    def check_params(self, params: SamplingParams | BeamSearchParams) -> None:
        """Checks of sampling or beam search parameters that need the model (the vocabulary)."""
        if not isinstance(params, (SamplingParams, BeamSearchParams)):
            raise TypeError(f"sampling params must be a SamplingParams or BeamSearchParams, "
                            f"got {type(params).__name__}")
        name, width = ("beam_width", params.beam_width) if isinstance(params, BeamSearchParams) else (
            ("best_of", params.best_of) if params.best_of else ("n", params.n))
        if width > self.max_num_seqs:
            raise ValueError(f"{name}={width} sequences cannot run at once with max_num_seqs={self.max_num_seqs}; "
                             f"allowed: {name} <= {self.max_num_seqs}, or raise max_num_seqs")
        if isinstance(params, BeamSearchParams):
            if 2 * params.beam_width > self.vocab_size:
                raise ValueError(f"beam_width={params.beam_width} is too wide for a vocabulary of {self.vocab_size} "
                                 f"tokens (each step weighs 2 * beam_width candidates); allowed: "
                                 f"1..{self.vocab_size // 2}")
            return
        bad = [t for t in params.stop_token_ids or [] if t >= self.vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {self.vocab_size})")
        bad = [t for t in params.logit_bias or {} if t >= self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias token ids {bad} are outside the vocabulary [0, {self.vocab_size})")

    def bad_words_token_ids(self, params: SamplingParams) -> list[list[int]]:
        """Each bad word's token ids, as vLLM finds them: the word alone and after a space, since a
        tokenizer may spell a word differently at the start of a text and in its middle."""
        words = []
        for word in params.bad_words or []:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in words and max(ids) < self.vocab_size:
                    words.append(ids)
        return words

    def check_constraint(self, params: SamplingParams | BeamSearchParams) -> None:
        """Compile the request's structured output constraint, if it has one (a ValueError if it cannot be), so
        that the engine finds it compiled. It may take a while: a server calls it off its event loop."""
        if isinstance(params, SamplingParams) and params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)

    def check_pooling(self, params, model: str | None = None) -> None:
        """A ValueError unless ``params`` are PoolingParams this pooling model can honour (``model``: its name,
        for the message); generation on a pooling model and embeddings from a generative one are refused."""
        if self.pooling is None:
            raise ValueError("embeddings need a pooling model, and this one generates (runner='generate'): load an "
                             "embedding model (runner='pooling' with no model loads all-MiniLM-L6-v2), or pass "
                             "runner='pooling' to embed with this model's last hidden state")
        if not isinstance(params, PoolingParams):
            raise ValueError(f"this is a pooling model (runner='pooling'): it gives embeddings (LLM.embed, POST "
                             f"/v1/embeddings), not generated text; got {type(params).__name__}")
        self.pooling.check(params, model)

    def validate(self, prompt: str | list[int], params: SamplingParams | BeamSearchParams | PoolingParams
                 ) -> list[int]:
        """Check a request without starting it; returns its prompt token ids."""
        if self.pooling is not None or isinstance(params, PoolingParams):
            self.check_pooling(params)
            return self.tokenize(prompt)
        self.check_params(params)
        ids = self.tokenize(prompt)
        self.check_constraint(params)
        return ids

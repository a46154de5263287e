"""Tiny random-weight checkpoints saved by transformers, with a byte-level BPE tokenizer trained on the spot: the
conformance suite's end-to-end model, and kvserve's own tests'."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Paged attention stores keys and values in blocks.",
    "Continuous batching lets new requests join while others decode; déjà vu, naïve café, 東京, 🙂.",
    "Once upon a time there was a tiny model that generated tokens one at a time, very quickly.",
] * 20

TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, initializer_range=0.3, bos_token_id=1, eos_token_id=2)


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY["vocab_size"], special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def randomize_biases(model: torch.nn.Module) -> None:
    """transformers initialises biases to zero, which a model that ignored them would match: make them count."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=TINY["initializer_range"], generator=generator)


def randomize_norms_and_biases(model: torch.nn.Module, norm_low: float = 0.5) -> None:
    """Draw every norm's weight from [norm_low, norm_low + 1) and every bias from [-0.5, 0.5): transformers
    initializes them to ones (or zeros) and zeros, which a model that swapped or misplaced a norm or dropped a bias
    would match."""
    generator = torch.Generator().manual_seed(0)
    norms = {f"{name}.weight" for name, module in model.named_modules()
             if isinstance(module, torch.nn.LayerNorm) or name.endswith("norm")}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in norms:
                param.uniform_(norm_low, norm_low + 1, generator=generator)
            elif name.endswith(".bias"):
                param.uniform_(-0.5, 0.5, generator=generator)


def save_tiny_model(path: str, config_cls: type[PretrainedConfig] = LlamaConfig,
                    tokenizer: PreTrainedTokenizerFast | None = None, **overrides) -> str:
    """Save a seeded float32 model of ``config_cls`` (TINY's sizes, with ``overrides``) and a tokenizer to
    ``path``; the default is a Llama with grouped-query attention (4 query heads, 2 kv heads)."""
    config = config_cls(**{**TINY, "num_key_value_heads": 2, "tie_word_embeddings": True, **overrides})
    config.architectures = [config_cls.__name__.replace("Config", "ForCausalLM")]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_biases(model)
    model.save_pretrained(path)
    (tokenizer or build_tokenizer()).save_pretrained(path)
    return path


def hf_greedy(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy tokens for each prompt, every one of ``max_new_tokens`` (no stop at EOS)."""
    model.generation_config.eos_token_id = None
    outputs = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        outputs.append(out[0, len(ids):].tolist())
    return outputs

"""LoRA adapters for the tests, made with peft over a tiny checkpoint."""
from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(base: str | torch.nn.Module, folder: str, seed: int, targets: list[str] | str, rank: int = 8,
                 **lora_options) -> tuple[str, torch.nn.Module]:
    """A PEFT adapter of random, non-zero A and B over ``base`` (a checkpoint's folder, or transformers' model,
    which it changes), saved to ``folder``; returns the folder and transformers' model with the adapter merged
    into its weights."""
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32) if isinstance(base, str) else base
    torch.manual_seed(seed)
    peft_model = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                               init_lora_weights=False, **lora_options))
    peft_model.save_pretrained(folder)
    return folder, peft_model.merge_and_unload().eval()

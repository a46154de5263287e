"""How ``kvserve serve`` listens and whom it answers: the server's own options, declared once like the engine's."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from kvserve.core.options import check_int, class_options, option


@dataclass(frozen=True)
class ServerOptions:
    host: str = option("127.0.0.1", "the address to bind; 0.0.0.0 serves the network")
    port: int = option(8000, "the port to listen on")
    served_model_name: list[str] | None = option(None, "the model name or names clients use (default: the model "
                                                       "as given)")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on every request (default: "
                                       "KVSERVE_API_KEY, if set)")
    enable_auto_tool_choice: bool = option(False, "let the model decide to call tools (tool_choice auto); needs "
                                                  "--tool-call-parser")
    tool_call_parser: str | None = option(None, "how the model writes tool calls: hermes, llama3_json, mistral, "
                                                "pythonic, or a plugin's")
    lora_modules: list[str] | None = option(None, "LoRA adapters served from the start, each NAME=PATH (a PEFT "
                                                  "folder): a request's model NAME runs it; needs --enable-lora")

    def __post_init__(self):
        check_int("port", self.port, 0, 65535)
        self.lora_adapters()

    def lora_adapters(self) -> dict[str, str]:
        """{name: folder} of the --lora-modules."""
        pairs = [module.partition("=") for module in self.lora_modules or ()]
        wrong = [name + sep + path for name, sep, path in pairs if not (name and sep and path)]
        if wrong:
            raise ValueError(f"lora_modules must each be NAME=PATH, got {', '.join(map(repr, wrong))}")
        names = [name for name, _, _ in pairs]
        if len(set(names)) < len(names):
            raise ValueError(f"lora_modules names each adapter once, got {', '.join(names)}")
        return {name: path for name, _, path in pairs}


def options_from(owner: type, args: argparse.Namespace):
    """An ``owner`` config (ServerOptions, ServerLimits) built from the flags a parsed command line holds."""
    return owner(**{option.field.name: getattr(args, option.name) for option in class_options(owner)})

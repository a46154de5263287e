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

    def __post_init__(self):
        check_int("port", self.port, 0, 65535)


def options_from(owner: type, args: argparse.Namespace):
    """An ``owner`` config (ServerOptions, ServerLimits) built from the flags a parsed command line holds."""
    return owner(**{option.field.name: getattr(args, option.name) for option in class_options(owner)})

"""Chat messages to a prompt with the model's Jinja chat template (as Hugging Face renders
them: a sandboxed environment, `raise_exception`, `add_generation_prompt=True`)."""
from __future__ import annotations

import json
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .openai_schema import ApiError


class TemplateError(ValueError):
    """A chat template that does not compile."""


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = _tojson
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template does not compile: {e}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=True,
                                        bos_token=self.bos_token, eos_token=self.eos_token,
                                        tools=None, documents=None)
        except jinja2.TemplateError as e:  # e.g. "roles must alternate user/assistant"
            raise ApiError(400, f"the model's chat template refused the messages: {e}",
                           param="messages") from None


def template_for(tokenizer: Any, override: str | None = None) -> ChatTemplate | None:
    """The tokenizer's template (`chat_template` attribute, HF tokenizers have one), or
    `override` (e.g. `mdi serve --chat-template FILE`); None when the model has none."""
    source = override or getattr(tokenizer, "chat_template", None)
    if not source:
        return None
    return ChatTemplate(source, getattr(tokenizer, "bos_token", None) or "",
                        getattr(tokenizer, "eos_token", None) or "")

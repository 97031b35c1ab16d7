"""Chat messages to a prompt with the model's Jinja chat template, rendered as Hugging Face
`apply_chat_template` renders it (templates are untrusted code: an immutable sandbox; the
same globals `raise_exception`, `strftime_now`, a `namespace` refusing underscore names,
the `tojson` filter that does not escape HTML, the `{% generation %}` tag), with
`add_generation_prompt=True`."""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment



class TemplateError(ValueError):
    """A chat template that does not compile, or that refuses a conversation."""


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace() without underscore attributes (no way to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's own signature trick
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-token mask): rendered as is."""
    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_Generation, "jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.globals["namespace"] = _Namespace
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
            raise TemplateError(f"the model's chat template refused the messages: {e}") from None


def template_for(tokenizer: Any, override: str | None = None) -> ChatTemplate | None:
    """The tokenizer's template (`chat_template` attribute, HF tokenizers have one), or
    `override` (e.g. `mdi serve --chat-template FILE`); None when the model has none."""
    source = override or getattr(tokenizer, "chat_template", None)
    if not source:
        return None
    return ChatTemplate(source, special_token(tokenizer, "bos_token"), special_token(tokenizer, "eos_token"))


def special_token(tokenizer: Any, name: str) -> str:
    """`bos_token` / `eos_token` as text: the tokenizer's attribute, else its
    tokenizer_config.json entry (a string or an AddedToken dict), else ""."""
    value = getattr(tokenizer, name, None)
    if value is None:
        value = (getattr(tokenizer, "tokenizer_config", None) or {}).get(name)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""

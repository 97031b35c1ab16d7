"""Chat templates render as Hugging Face's apply_chat_template renders them."""
from __future__ import annotations

import pytest

from mdi.generate.chat_template import ChatTemplate, TemplateError, template_for

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>&</b>"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
# Features real templates use: namespace(), tojson, loop controls, strftime_now, {% generation %}.
FEATURES = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}"
            "{% endif %}{% set ns.n = ns.n + 1 %}{{ ns.n }} {{ m | tojson }}\n"
            "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% endif %}"
            "{% endfor %}{{ strftime_now('%Y')[:2] }}{% if add_generation_prompt %}<assistant>{% endif %}")


def smollm2_template() -> str:
    gguf = pytest.importorskip("gguf")
    from mdi.checkpoint import CheckpointError
    from mdi.checkpoint.shipped import shipped_path

    try:
        path = shipped_path("smollm2-135m-instruct")
    except CheckpointError as e:
        pytest.skip(str(e))
    field = gguf.GGUFReader(path).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode()


@pytest.mark.parametrize("name", ["smollm2", "features"])
def test_same_text_as_transformers(name):
    hf = pytest.importorskip("transformers.utils.chat_template_utils")
    source = smollm2_template() if name == "smollm2" else FEATURES
    ours = ChatTemplate(source, "<s>", "</s>").render(MESSAGES)
    theirs = hf.render_jinja_template([MESSAGES], chat_template=source, add_generation_prompt=True,
                                      bos_token="<s>", eos_token="</s>")
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    theirs = theirs[0] if isinstance(theirs, list) else theirs
    assert ours == theirs
    if name == "smollm2":
        assert ours.endswith("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")


def test_sandbox_and_refusals():
    with pytest.raises(TemplateError, match="refused the messages: roles must alternate"):
        ChatTemplate("{{ raise_exception('roles must alternate') }}").render(MESSAGES)
    with pytest.raises(TemplateError):  # the sandbox: no attribute walk to Python internals
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(MESSAGES)
    with pytest.raises(TemplateError):
        ChatTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}").render(MESSAGES)
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_special_tokens_from_the_tokenizer_config():
    class Tok:
        chat_template = "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"
        tokenizer_config = {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>"}

    assert template_for(Tok()).render([{"role": "user", "content": "hi"}]) == "<s>hi</s>"


def test_template_for_prefers_the_override():
    class Tok:
        chat_template = "tok"
        eos_token = "</s>"

    assert template_for(Tok()).render([]) == "tok"
    assert template_for(Tok(), "override {{ eos_token }}").render([]) == "override </s>"
    assert template_for(object()) is None

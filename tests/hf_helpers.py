"""Tiny Hugging Face model directories written locally with `save_pretrained`
(never downloaded), and the reference numbers `transformers` gives for them."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

VOCAB = 128
TEXT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet "
        "is the sun.\nJULIET: O Romeo, Romeo, wherefore art thou Romeo?\n") * 4

# name -> (transformers config class, kwargs); each covers a feature of the decoder.
CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", dict(n_positions=64, n_embd=32, n_layer=3, n_head=4)),
    "gpt2-untied": ("GPT2Config", dict(n_positions=64, n_embd=32, n_layer=3, n_head=4,
                                       tie_word_embeddings=False, activation_function="gelu")),
    "llama-gqa-llama3rope": ("LlamaConfig", dict(
        hidden_size=32, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-tied-bias": ("LlamaConfig", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=64, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_theta=500.0)),
    "qwen2": ("Qwen2Config", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=None)),
}
MODEL_CLASSES = {"GPT2Config": "GPT2LMHeadModel", "LlamaConfig": "LlamaForCausalLM",
                 "Qwen2Config": "Qwen2ForCausalLM", "MistralConfig": "MistralForCausalLM"}


def write_tokenizer(out: Path, bos: bool) -> None:
    """A byte-level BPE tokenizer.json with <s> and </s>, and its config files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:0],
                                  show_progress=False)
    tok.train_from_iterator([TEXT], trainer=trainer)
    (out / "tokenizer.json").write_text(tok.to_str())
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": bos,
           "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))


def make_hf_dir(out: Path, name: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                shard: str | None = None, **override) -> Path:
    """Save a random tiny model `name` (see CONFIGS) with its tokenizer; return the directory."""
    import transformers

    cls_name, kw = CONFIGS[name]
    config = getattr(transformers, cls_name)(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
                                             initializer_range=0.2, **{**kw, **override})
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[cls_name])(config).to(dtype).eval()
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so a mix-up shows
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=shard) if shard else model.save_pretrained(out)
    write_tokenizer(out, bos=cls_name != "GPT2Config")
    return out


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], n_tokens: int) -> list[int]:
    """transformers' greedy continuation: full forwards, argmax of the last logits."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt):]

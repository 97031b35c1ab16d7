"""Hugging Face directories: mdi's numbers equal transformers' for GPT-2, Llama
(GQA, Llama-3 rope scaling, biases, tied and untied heads, sharded files),
Qwen2 (QKV bias) and Mistral; stages equal the whole model; chunks, streams and
`mdi convert` keep the numbers; what the decoder cannot do is refused by name."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch
from hf_helpers import CONFIGS, hf_greedy, hf_model, make_hf_dir

from mdi.checkpoint import CheckpointError, LoadOptions, load_model, load_stage, open_checkpoint
from mdi.checkpoint.chunks import load_chunk, read_chunk_info
from mdi.checkpoint.format import expected_shapes
from mdi.checkpoint.hf import HFCheckpoint
from mdi.checkpoint.sources import convert_to_ours
from mdi.checkpoint.stream import read_stream, shard_stream
from mdi.generate.local import generate_timed
from mdi.generate.sampling import SamplingConfig
from mdi.ring.plan.partition import Shard
from mdi.ring.cluster.split import write_chunks

GREEDY = SamplingConfig(temperature=0.0, top_k=None, seed=0)
PROMPTS = [[1, 5, 9, 33, 70, 2, 100, 7, 8, 64, 12, 90], [1, 44, 3, 3, 17, 120]]
SHARDED = {"llama-gqa-llama3rope": "20KB", "qwen2": "30KB"}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_dir(request, tmp_path_factory):
    name = request.param
    return make_hf_dir(tmp_path_factory.mktemp(name), name, shard=SHARDED.get(name))


@pytest.fixture(scope="module")
def ref(hf_dir):
    return hf_model(hf_dir)


def padded(prompts: list[list[int]]) -> tuple[torch.Tensor, int]:
    n = min(len(p) for p in prompts)
    return torch.tensor([p[:n] for p in prompts]), n


def test_sharded_files_are_read(hf_dir):
    name = hf_dir.name.rstrip("0123456789")
    if name in SHARDED:
        assert (hf_dir / "model.safetensors.index.json").is_file()
        assert len(list(hf_dir.glob("model-*-of-*.safetensors"))) > 2


def test_uncached_logits_equal_transformers(hf_dir, ref):
    loaded = load_model(hf_dir)
    model, ck = loaded.model, loaded.checkpoint
    assert isinstance(ck, HFCheckpoint) and model.config.n_layer == 3
    x, _ = padded(PROMPTS)
    with torch.no_grad():
        ours, theirs = model(x), ref(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_cached_logits_equal_transformers(hf_dir, ref):
    """Prefill, then one token at a time, rows at different positions."""
    model = load_model(hf_dir).model
    cache = model.new_cache(len(PROMPTS))
    with torch.no_grad():
        for row, p in enumerate(PROMPTS):
            pre = p[:4]
            out = model(torch.tensor([pre]), torch.arange(len(pre))[None], cache.rows(row, row + 1))
            torch.testing.assert_close(out[0], ref(torch.tensor([pre])).logits[0], atol=1e-4, rtol=0)
        pos = [4, 4]
        for step in range(4, min(len(p) for p in PROMPTS)):
            toks = torch.tensor([[p[step]] for p in PROMPTS])
            out = model(toks, torch.tensor([[q] for q in pos]), cache)  # (B, 1, V)
            for row, p in enumerate(PROMPTS):
                want = ref(torch.tensor([p[:step + 1]])).logits[0, -1]
                torch.testing.assert_close(out[row, 0], want, atol=1e-4, rtol=0)
            pos = [q + 1 for q in pos]


def test_greedy_continuation_equals_transformers(hf_dir, ref):
    model = load_model(hf_dir).model
    result = generate_timed(model, PROMPTS, 30, GREEDY, 1)
    assert result.tokens == [hf_greedy(ref, p, 30) for p in PROMPTS]


def test_split_stages_equal_whole(hf_dir):
    whole = load_model(hf_dir).model
    stages = [load_stage(hf_dir, a, b)[0] for a, b in ((0, 1), (1, 2), (2, 3))]
    assert [s.has_embeddings for s in stages] == [True, False, False]
    x, n = padded(PROMPTS)
    pos = torch.arange(n).expand(len(PROMPTS), n)
    caches = [s.new_cache(len(PROMPTS)) for s in stages]
    with torch.no_grad():
        want = whole(x, pos, whole.new_cache(len(PROMPTS)))
        h = x
        for s, c in zip(stages, caches):
            h = s(h, pos, c)
    assert torch.equal(h, want)


def test_stream_and_chunks_carry_our_names(hf_dir, tmp_path):
    ck = open_checkpoint(hf_dir)
    whole = load_model(hf_dir).model
    sd = whole.state_dict()
    shard = Shard(1, 3, 3)
    total, chunks = shard_stream(hf_dir, shard)
    data = b"".join(chunks)
    assert len(data) == total

    async def one():
        yield data

    got = asyncio.run(read_stream(one(), expected_shapes(ck.config, 1, 3)))
    assert got.keys() == expected_shapes(ck.config, 1, 3).keys()
    for k, v in got.items():
        assert torch.equal(v, sd[k]), k
    dirs = write_chunks(hf_dir, 2, tmp_path / "chunks")
    for d in dirs:
        info = read_chunk_info(d)
        stage = load_chunk(d, ck.config, info["start"], info["stop"])
        for k, v in stage.state_dict().items():
            assert torch.equal(v, sd[k]), k
    assert (dirs[0] / "tokenizer.json").is_file() and (dirs[0] / "tokenizer_config.json").is_file()


def test_convert_to_our_format_keeps_the_numbers(hf_dir, tmp_path):
    out = convert_to_ours(hf_dir, tmp_path / "ours")
    loaded = load_model(out)
    ours, info = loaded.model, loaded.checkpoint
    theirs = load_model(hf_dir).model
    assert info.kind == "mdi" and info.config == theirs.config
    x, _ = padded(PROMPTS)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    tok = info.tokenizer()
    assert tok.kind == "hf" and tok.eos_ids == (2,)
    assert tok.encode("ROMEO: But") == open_checkpoint(hf_dir).tokenizer().encode("ROMEO: But")


def test_stored_dtype_is_kept_or_cast(tmp_path):
    d = make_hf_dir(tmp_path / "bf16", "qwen2", dtype=torch.bfloat16)
    model = load_model(d).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model = load_model(d, LoadOptions(dtype=torch.float32)).model
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        model(torch.tensor(PROMPTS[:1]))


# ---- refusals ---------------------------------------------------------------------
def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("refuse"), "mistral")


@pytest.mark.parametrize("changes,match", [
    (dict(architectures=["BertForMaskedLM"]), "architecture 'BertForMaskedLM' is not supported"),
    (dict(sliding_window=16), "sliding_window=16 is not supported"),
    (dict(num_local_experts=8), "num_local_experts=8 is not supported.*mixture-of-experts"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     "rope_type='yarn' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config='gptq'"),
])
def test_refused_by_name(mistral_dir, tmp_path, changes, match):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(mistral_dir, d)
    _edit_config(d, **changes)
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(d)


def test_sliding_window_at_least_max_positions_is_fine(mistral_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(mistral_dir, d)
    _edit_config(d, sliding_window=64)
    assert open_checkpoint(d).config.n_kv_head == 2


def test_unexplained_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    d = make_hf_dir(tmp_path / "q", "qwen2")
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.mlp.experts.0.weight"] = torch.zeros(2)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not explain: model.layers.0.mlp.experts.0.weight"):
        open_checkpoint(d)


def test_hub_name_offline_and_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="cannot get nobody/nothing.*HF_HUB_OFFLINE"):
        open_checkpoint("hf:nobody/nothing@main")
    with pytest.raises(CheckpointError, match="expected hf:ORG/NAME"):
        open_checkpoint("hf:no-slash")


# ---- bench shapes -------------------------------------------------------------------
@pytest.mark.parametrize("name,layers,kv", [("smollm2-135m", 30, 3), ("tinyllama-1.1b", 22, 4)])
def test_bench_shapes_map_onto_the_decoder(name, layers, kv):
    from mdi.bench.models import HF_SIZES, llama_hf_shapes
    from mdi.checkpoint.hf_map import config_from_hf

    config, _ = config_from_hf(HF_SIZES[name])
    assert (config.n_layer, config.kv_heads, config.positions, config.activation) == \
        (layers, kv, "rope", "swiglu")
    shapes = llama_hf_shapes(HF_SIZES[name])
    n = sum(torch.Size(s).numel() for s in shapes.values())
    assert n == pytest.approx({"smollm2-135m": 134.5e6, "tinyllama-1.1b": 1.1e9}[name], rel=0.01)


def test_random_hf_dir_is_loadable_and_sharded(tmp_path):
    from mdi.bench.models import write_random_hf_dir

    hf = dict(architectures=["LlamaForCausalLM"], hidden_size=32, intermediate_size=48,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
              max_position_embeddings=32, tie_word_embeddings=False)
    d = write_random_hf_dir(hf, tmp_path / "r", shard_bytes=8000)
    assert len(list(d.glob("model-*-of-*.safetensors"))) > 1
    loaded = load_model(d)
    model, ck = loaded.model, loaded.checkpoint
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = ck.tokenizer().encode("\nhello")
    assert len(ids) == 6 and ck.tokenizer().decode(ids) == "\nhello"
    with torch.no_grad():
        assert model(torch.tensor([ids])).shape == (1, 6, 300)


# ---- config -------------------------------------------------------------------------
def test_config_defaults_are_nanogpt_and_old_configs_load():
    from mdi.model import GPT, GPTConfig

    old = dict(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False,
               activation="gelu", head_bias=False, layer_norm_eps=1e-5)
    c = GPTConfig.from_dict(old)
    assert (c.norm, c.positions, c.kv_heads, c.mlp_size, c.tie_embeddings) == \
        ("layernorm", "learned", 2, 128, True)
    assert not any(c.bias_of(w) for w in ("qkv", "attn_proj", "mlp", "norm"))
    names = set(GPT(c).state_dict())
    assert {"transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
            "transformer.h.1.mlp.c_fc.weight", "transformer.ln_f.weight"} <= names
    assert GPTConfig.from_dict({**old, "qkv_bias": None, "n_kv_head": 1}).kv_heads == 1


@pytest.mark.parametrize("changes,match", [
    (dict(n_kv_head=3), "multiple of n_kv_head"),
    (dict(norm="batchnorm"), "GPTConfig.norm"),
    (dict(positions="alibi"), "GPTConfig.positions"),
    (dict(rope_scaling="yarn"), "GPTConfig.rope_scaling"),
    (dict(qkv_bias="yes"), "qkv_bias"),
    (dict(intermediate_size=-1), "intermediate_size"),
])
def test_config_validation_names_the_field(changes, match):
    from mdi.model import GPTConfig

    with pytest.raises(ValueError, match=match):
        GPTConfig.from_dict({"n_head": 4, "n_embd": 32, **changes})

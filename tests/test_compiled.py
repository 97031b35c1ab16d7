"""`--compile`: the decode step compiled with Inductor (model/compiled.py).

The compiled step is float maths in another order (Inductor fuses the norms,
RoPE and the cache write; the GEMMs and attention stay aten's), so its logits
may differ from the eager step's in the last bits: asserted within
LOGIT_ATOL, and the greedy tokens equal. Compiling takes a minute or more on
two cores: those tests are slow, one tiny model per form.
"""
from __future__ import annotations

import pytest
import torch

from mdi.bench.compile_bench import CompileBenchConfig, decode_rate
from mdi.generate import step
from mdi.model import aoti
from mdi.model import compiled as compiled_mod
from mdi.model.compiled import CompiledDecode, bucket, compile_unavailable
from mdi.model.config import GPTConfig
from mdi.model.quant import configure_stage

LLAMA = dict(norm="rmsnorm", positions="rope", activation="swiglu", n_kv_head=1, bias=False)
LOGIT_ATOL = 1e-4  # measured: 2e-6 (float32, both forms); int8 and int4 were equal bit for bit
PROMPTS = [[3, 1, 4, 1], [5, 9, 2, 6, 5], [3, 5, 8, 9, 7, 9]]  # rows at three positions
N_TOKENS = 11  # the last row reaches position 15, the last of a 16-position cache
needs_compiler = pytest.mark.skipif(compile_unavailable() is not None,
                                    reason=f"cannot compile here: {compile_unavailable()}")


def _greedy(model, n_tokens: int, cache_rows: int) -> tuple[torch.Tensor, list, torch.Tensor]:
    """Prefill PROMPTS into rows 0..2 of a cache of cache_rows rows, decode greedily;
    returns the logits of every step, the tokens, and the cache's last row."""
    cache = model.new_cache(cache_rows)
    if cache_rows > len(PROMPTS):  # a row the step does not hold: padding must not touch it
        step.prefill(model, cache, cache_rows - 1, [7, 7, 7])
    logits, tokens = [], []
    with torch.inference_mode():
        for row, p in enumerate(PROMPTS):
            step.prefill(model, cache, row, p[:-1])
        tok, pos = [p[-1] for p in PROMPTS], [len(p) - 1 for p in PROMPTS]
        for _ in range(n_tokens):
            out = step.decode(model, cache.rows(0, len(PROMPTS)), tok, pos)
            logits.append(out)
            tok = out.argmax(-1).tolist()
            tokens.append(tok)
            pos = [p + 1 for p in pos]
    return torch.stack(logits), tokens, cache.kv[0][:, -1].clone()


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("form, how", [({}, "aoti"), (LLAMA, "aoti"), (LLAMA, "inductor")],
                         ids=["gpt2-aoti", "llama-aoti", "llama-inductor"])
def test_compiled_decode_gives_the_eager_tokens(make_model, form, how, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    # 16 positions: the last step's row at position 15 reads the whole cache (L == T),
    # which no AOTInductor package covers: that step runs eagerly
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=64, **form)
    eager = configure_stage(make_model(config, seed=1), pack=False)
    compiled = configure_stage(make_model(config, seed=1), pack=True, compile=True)
    assert compiled.compiled_decode is not None and not compiled.packed_linears
    compiled.compiled_decode.how = how
    # 3 rows of a 4-row cache: the step runs as the 4-row bucket, its 4th row padding
    want, want_tokens, want_last = _greedy(eager, N_TOKENS, 4)
    got, got_tokens, got_last = _greedy(compiled, N_TOKENS, 4)
    assert got_tokens == want_tokens
    torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)
    assert torch.equal(got_last, want_last)  # the padding row's cache: not written
    assert list(compiled.compiled_decode.shapes) == [(4, torch.int64, False)]  # one graph (ids in)
    packages = sorted((tmp_path / "inductor" / "mdi-aoti").glob("*.pt2"))
    assert len(packages) == (how == "aoti")
    if how == "aoti":  # a second start loads the package: nothing built, the same tokens
        def no_build(*args, **kwargs):
            raise AssertionError("built again")
        monkeypatch.setattr(aoti, "build_package", no_build)
        again = configure_stage(make_model(config, seed=1), pack=True, compile=True)
        got, got_tokens, _ = _greedy(again, N_TOKENS, 4)
        assert got_tokens == want_tokens
        torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.slow
@needs_compiler
def test_a_torn_package_is_built_again(make_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)
    eager = configure_stage(make_model(config, seed=1), pack=False)
    compiled = configure_stage(make_model(config, seed=1), pack=True, compile=True)
    want = _greedy(eager, 3, 4)[1]
    assert _greedy(compiled, 3, 4)[1] == want
    (package,) = (tmp_path / "inductor" / "mdi-aoti").glob("*.pt2")
    package.write_bytes(b"not a package")
    again = configure_stage(make_model(config, seed=1), pack=True, compile=True)
    assert _greedy(again, 3, 4)[1] == want
    assert package.stat().st_size > 1000  # built and stored again


@pytest.mark.slow
@needs_compiler
def test_a_package_serves_another_checkpoint_of_the_same_shapes(make_model, tmp_path, monkeypatch):
    # int8: the head's bfloat16 scales are made from its weights on first use, an
    # attribute the package reads from the stage it is loaded for, not the builder's
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=64, **LLAMA)
    for seed in (1, 2):  # the second loads the first's package
        eager = configure_stage(make_model(config, seed=seed), "int8", pack=False)
        compiled = configure_stage(make_model(config, seed=seed), "int8", pack=True, compile=True)
        want, want_tokens, _ = _greedy(eager, 4, 4)
        got, got_tokens, _ = _greedy(compiled, 4, 4)
        assert got_tokens == want_tokens
        torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)
    assert len(list((tmp_path / "inductor" / "mdi-aoti").glob("*.pt2"))) == 1


@pytest.mark.slow
@needs_compiler
def test_an_int4_step_compiles_to_the_eager_kernels(make_model, tmp_path, monkeypatch):
    """int4 layers compute with mdi's own kernel (model/csrc/lowbit_ops.cpp, float32
    activations) in eager steps and, through its fake kernel, in the compiled package:
    the same tokens, logits within float32 rounding (torch's bfloat16 kernel would be
    ~1e-2 away)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=64, **LLAMA)
    eager = configure_stage(make_model(config, seed=3), "int4", pack=False)
    compiled = configure_stage(make_model(config, seed=3), "int4", pack=True, compile=True)
    want, want_tokens, _ = _greedy(eager, 4, 4)
    got, got_tokens, _ = _greedy(compiled, 4, 4)
    assert got_tokens == want_tokens
    torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)


def test_a_package_key_follows_the_shapes_not_the_weights(make_model, monkeypatch):
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)
    a, b = make_model(config, seed=1), make_model(config, seed=2)
    x, kv = torch.zeros(4, 1, dtype=torch.long), a.new_cache(4).kv
    key = aoti.package_key(a, x, kv, False)
    assert aoti.package_key(b, x, kv, False) == key  # other weights, the same code
    wide = a.new_cache(8).kv  # the same 4 rows as views of a cache of 8: other strides
    others = [aoti.package_key(a, x[:2], kv, False), aoti.package_key(a, x, kv, True),
              aoti.package_key(a, x, [t[:, :4] for t in wide], False),
              aoti.package_key(a, x, kv, False, {"cpp_wrapper": True}),
              aoti.package_key(make_model(GPTConfig(**{**config.__dict__, "n_layer": 2}), seed=1),
                               x, kv, False)]
    assert len({key, *others}) == 1 + len(others)
    monkeypatch.setattr(aoti, "source_digest", lambda: "an edited layers.py")
    assert aoti.package_key(a, x, kv, False) != key  # the model's code changed: built again


def test_compiled_decode_names_an_unknown_way(make_model):
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)
    with pytest.raises(ValueError, match="aoti or inductor"):
        CompiledDecode(make_model(config, seed=1), how="dynamo")


def test_compile_refuses_batch_invariant(make_model):
    config = GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32)
    with pytest.raises(ValueError, match="--batch-invariant"):
        configure_stage(make_model(config, seed=1), batch_invariant=True, compile=True)


def test_the_cli_refuses_compile_with_batch_invariant_and_on_a_ring(capsys):
    from mdi.cli.main import main

    for argv, what in ((["sample", "--compile", "--batch-invariant"], "--batch-invariant"),
                       (["run", "--compile"], "single-device")):
        assert main([*argv, "--ckpt", "models/shakespeare-char", "--n-tokens", "2"]) != 0
        assert f"{argv[0]}: error: --compile" in (err := capsys.readouterr().err) and what in err


def test_compile_without_a_cxx_compiler_names_what_is_missing(make_model, monkeypatch):
    monkeypatch.setattr(compiled_mod.shutil, "which", lambda name: None)
    assert "C++ compiler" in compile_unavailable()
    config = GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=32)
    with pytest.raises(RuntimeError, match="--compile: no C\\+\\+ compiler"):
        CompiledDecode(make_model(config, seed=1))


@pytest.mark.parametrize("rows, limit, want", [
    (1, 8, 1), (2, 8, 2), (3, 8, 4), (5, 8, 8), (8, 8, 8), (3, 3, 3), (9, 12, 12),
    (17, 64, 32), (65, 100, 65),
])
def test_rows_pad_to_a_bucket_within_the_cache(rows, limit, want):
    assert bucket(rows, limit) == want


def test_bench_compile_rates_and_modes():
    # 4 steps ending at 1, 2, 3, 5 s: after the first two, 2 steps of 2 rows in 3 s
    assert decode_rate([1.0, 2.0, 3.0, 5.0], 2) == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="off and on"):
        CompileBenchConfig(ckpt="x", modes=["of"])


def test_packages_unused_for_a_month_are_deleted_when_one_is_built(tmp_path):
    import os
    import time

    old, recent, new = (tmp_path / f"decode-{n}.pt2" for n in ("old", "recent", "new"))
    for p in (old, recent, new):
        p.write_bytes(b"x")
        p.with_name(p.name + ".consts").write_bytes(b"c")
    month = time.time() - 31 * 86400
    os.utime(old, (month, month))
    os.utime(new, (month, month))  # the one just built is never deleted
    os.utime(recent, (time.time() - 86400,) * 2)
    assert aoti.prune(tmp_path, keep=new) == [old]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "decode-new.pt2", "decode-new.pt2.consts", "decode-recent.pt2", "decode-recent.pt2.consts"]


def test_the_cache_follows_torchinductor_then_mdi_cache_dir(tmp_path):
    from pathlib import Path

    assert compiled_mod.cache_dir({"TORCHINDUCTOR_CACHE_DIR": "/a", "MDI_CACHE_DIR": "/b"}) == Path("/a")
    assert compiled_mod.cache_dir({"MDI_CACHE_DIR": "/b"}) == Path("/b/inductor")
    assert compiled_mod.cache_dir({}) == Path.home() / ".cache" / "mdi" / "inductor"

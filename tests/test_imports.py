"""`mdi convert`: nanoGPT and original-MDI checkpoints give the same logits in our model."""
from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdi.checkpoint import CheckpointError, load_model
from mdi.checkpoint.imports import convert
from mdi.checkpoint.unpickle import RestrictedUnpickler, load_meta_pkl
from mdi.cli.convert import register

torch.set_num_threads(1)

CHARS = "\n !abcdefghij"  # vocabulary of 13
V, BLOCK, L, NH, C = len(CHARS), 16, 2, 4, 32


def write_meta(path, chars=CHARS):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    return path


# ---- karpathy/nanoGPT: its tensors and a functional copy of its forward ----

def nanogpt_state(bias: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, mean=0.0):
        return mean + 0.3 * torch.randn(*shape, generator=g)

    sd = {"transformer.wte.weight": r(V, C), "transformer.wpe.weight": r(BLOCK, C)}
    for i in range(L):
        p = f"transformer.h.{i}."
        for name, (o, n) in {"attn.c_attn": (3 * C, C), "attn.c_proj": (C, C),
                             "mlp.c_fc": (4 * C, C), "mlp.c_proj": (C, 4 * C)}.items():
            sd[p + name + ".weight"] = r(o, n)
            if bias:
                sd[p + name + ".bias"] = r(o)
        for ln in ("ln_1", "ln_2"):
            sd[p + ln + ".weight"] = r(C, mean=1.0)
            if bias:
                sd[p + ln + ".bias"] = r(C)
    sd["transformer.ln_f.weight"] = r(C, mean=1.0)
    if bias:
        sd["transformer.ln_f.bias"] = r(C)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied, saved under both names
    return sd


def nanogpt_forward(sd: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    B, T = idx.shape
    hs = C // NH

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))

    def ln(x, name):
        return F.layer_norm(x, (C,), sd[name + ".weight"], sd.get(name + ".bias"), 1e-5)

    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(L):
        p = f"transformer.h.{i}."
        q, k, v = lin(ln(x, p + "ln_1"), p + "attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, NH, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / hs ** 0.5
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + lin(y, p + "attn.c_proj")
        x = x + lin(F.gelu(lin(ln(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return ln(x, "transformer.ln_f") @ sd["transformer.wte.weight"].t()


def save_nanogpt(path, sd, bias: bool, dataset: str = "tiny"):
    model = {"_orig_mod." + k: v for k, v in sd.items()}  # as saved from a torch.compile'd model
    for i in range(L):  # the causal-mask buffers nanoGPT keeps without flash attention
        model[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(
            torch.ones(BLOCK, BLOCK)).view(1, 1, BLOCK, BLOCK)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "iter_num": 500, "best_val_loss": torch.tensor(1.25),
                "model_args": {"n_layer": L, "n_head": NH, "n_embd": C, "block_size": BLOCK,
                               "bias": bias, "vocab_size": V, "dropout": 0.1},
                "config": {"dataset": dataset, "batch_size": 12, "compile": True}}, path)
    return path


# ---- the original MDI model, with exactly its parameter names ----

class Head(nn.Module):
    def __init__(self, hs: int) -> None:
        super().__init__()
        self.key = nn.Linear(C, hs, bias=False)
        self.query = nn.Linear(C, hs, bias=False)
        self.value = nn.Linear(C, hs, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(BLOCK, BLOCK)))

    def forward(self, x):
        T = x.shape[1]
        k, q, v = self.key(x), self.query(x), self.value(x)  # (B, T, hs)
        wei = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf")).softmax(-1)
        return wei @ v


class MultiHeadAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList([Head(C // NH) for _ in range(NH)])
        self.proj = nn.Linear(C, C)

    def forward(self, x):
        return self.proj(torch.cat([h(x) for h in self.heads], dim=-1))


class Block(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(C, bias=bias)
        self.mha = MultiHeadAttention()
        self.ln2 = nn.LayerNorm(C, bias=bias)
        self.ffwd = nn.Module()
        self.ffwd.net = nn.Sequential(nn.Linear(C, 4 * C), nn.ReLU(), nn.Linear(4 * C, C),
                                      nn.Dropout(0.0))

    def forward(self, x):
        x = x + self.mha(self.ln1(x))
        return x + self.ffwd.net(self.ln2(x))


class OriginalGPT(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            token_embedding=nn.Embedding(V, C), position_embedding=nn.Embedding(BLOCK, C),
            drop=nn.Dropout(0.0), layers=nn.ModuleList([Block(bias) for _ in range(L)]),
            ln_f=nn.LayerNorm(C, bias=bias)))
        self.lm_head = nn.Linear(C, V)
        self.transformer.token_embedding.weight = self.lm_head.weight  # tied

    def forward(self, idx):
        T = idx.shape[1]
        x = self.transformer.token_embedding(idx) + self.transformer.position_embedding(
            torch.arange(T))
        for block in self.transformer.layers:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def original_model(bias: bool, seed: int = 0) -> OriginalGPT:
    torch.manual_seed(seed)
    model = OriginalGPT(bias)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.3 * torch.randn_like(p))  # non-trivial LayerNorm weights and biases too
    return model.eval()


def save_original(path, model: OriginalGPT, bias: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()  # a real optimizer state: exp_avg, exp_avg_sq, step
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "model_args": {"batch_size": 8, "block_size": BLOCK, "vocab_size": V,
                               "n_layer": L, "n_head": NH, "n_embd": C, "dropout": 0.2,
                               "bias": bias},
                "iter_num": 300, "best_val_loss": 1.5, "config": {"DATASET": "tiny"}}, path)
    return path


def tokens(seed: int = 1, T: int = 11) -> torch.Tensor:
    return torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(seed))


# ---- equivalence ----

@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_logits_match(tmp_path, bias):
    sd = nanogpt_state(bias)
    src = save_nanogpt(tmp_path / "out-tiny" / "ckpt.pt", sd, bias)
    meta = write_meta(tmp_path / "vocab.pkl")
    out = convert(src, tmp_path / "ours", meta=meta)
    loaded = load_model(out)
    model, info = loaded.model, loaded.checkpoint
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), nanogpt_forward(sd, idx), atol=1e-5, rtol=0)
    assert info.config.activation == "gelu" and not info.config.head_bias
    assert info.config.bias is bias
    assert info.training == {"imported_from": "nanogpt", "source": str(src), "iter_num": 500,
                             "best_val_loss": 1.25}
    assert info.tokenizer().decode(info.tokenizer().encode("abc !")) == "abc !"


@pytest.mark.parametrize("bias", [True, False])
def test_original_mdi_logits_match(tmp_path, bias):
    ref = original_model(bias)
    src = save_original(tmp_path / "ckpt.pt", ref, bias)
    out = convert(src, tmp_path / "ours", meta=write_meta(tmp_path / "m.pkl"))
    loaded = load_model(out)
    model, info = loaded.model, loaded.checkpoint
    idx = tokens(T=BLOCK)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx), atol=1e-5, rtol=0)
    assert (info.config.activation, info.config.head_bias, info.config.bias) == ("relu", True, True)
    assert info.training["imported_from"] == "mdi-original"
    assert info.training["iter_num"] == 300 and info.training["best_val_loss"] == 1.5


def test_original_mdi_earlier_names(tmp_path):
    """Earlier versions named the blocks `transformer.mha.{i}` and their attention `sa`."""
    ref = original_model(True)
    src = save_original(tmp_path / "ckpt.pt", ref, True)
    ckpt = torch.load(src, weights_only=True)
    ckpt["model"] = {k.replace("transformer.layers.", "transformer.mha.").replace(".mha.heads", ".sa.heads")
                     .replace(".mha.proj", ".sa.proj"): v for k, v in ckpt["model"].items()}
    torch.save(ckpt, src)
    model = load_model(convert(src, tmp_path / "ours", meta=write_meta(tmp_path / "m.pkl"))).model
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()), ref(tokens()), atol=1e-5, rtol=0)


# ---- meta.pkl discovery ----

def test_meta_found_next_to_checkpoint(tmp_path):
    src = save_nanogpt(tmp_path / "ckpt.pt", nanogpt_state(True), True)
    write_meta(tmp_path / "meta.pkl")
    info = load_model(convert(src, tmp_path / "ours")).checkpoint
    assert info.tokenizer().itos == list(CHARS)


def test_meta_found_in_source_layouts(tmp_path):
    # nanoGPT: ROOT/out-tiny/ckpt.pt with ROOT/data/<config dataset>/meta.pkl
    write_meta(tmp_path / "nano" / "data" / "shakespeare_char" / "meta.pkl")
    write_meta(tmp_path / "nano" / "data" / "other" / "meta.pkl", CHARS[::-1])
    src = save_nanogpt(tmp_path / "nano" / "out-tiny" / "ckpt.pt", nanogpt_state(True), True,
                       dataset="shakespeare_char")
    assert load_model(convert(src, tmp_path / "a")).checkpoint.tokenizer().itos == list(CHARS)
    # original MDI: data/<dataset>/out/ckpt.pt with data/<dataset>/meta.pkl
    write_meta(tmp_path / "mdi" / "data" / "tiny" / "meta.pkl")
    src = save_original(tmp_path / "mdi" / "data" / "tiny" / "out" / "ckpt.pt", original_model(True), True)
    assert load_model(convert(src, tmp_path / "b")).checkpoint.tokenizer().itos == list(CHARS)


def test_missing_meta_says_where_it_looked(tmp_path):
    src = save_nanogpt(tmp_path / "run" / "ckpt.pt", nanogpt_state(True), True)
    with pytest.raises(CheckpointError, match="--meta") as e:
        convert(src, tmp_path / "ours")
    assert str(tmp_path / "run" / "meta.pkl") in str(e.value)
    assert not (tmp_path / "ours").exists()


def test_meta_vocab_size_must_match(tmp_path):
    src = save_nanogpt(tmp_path / "ckpt.pt", nanogpt_state(True), True)
    with pytest.raises(CheckpointError, match="vocab_size"):
        convert(src, tmp_path / "ours", meta=write_meta(tmp_path / "m.pkl", CHARS[:-2]))


# ---- the restricted unpickler ----

class WritesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsCommand:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("evil", [WritesFile, RunsCommand])
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_meta_pkl_never_runs_code(tmp_path, evil, protocol):
    target = tmp_path / "pwned"
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps({"itos": {0: "a"}, "x": evil(str(target))}, protocol=protocol))
    with pytest.raises(CheckpointError, match="refusing"):
        load_meta_pkl(path)
    # find_class alone refuses too (the opcode scan runs before it in load_meta_pkl)
    with open(path, "rb") as f, pytest.raises(CheckpointError, match="refusing"):
        RestrictedUnpickler(f).load()
    assert not target.exists()
    src = save_nanogpt(tmp_path / "ckpt.pt", nanogpt_state(True), True)
    with pytest.raises(CheckpointError):
        convert(src, tmp_path / "ours", meta=path)
    assert not target.exists() and not (tmp_path / "ours").exists()


@pytest.mark.parametrize("meta, match", [
    ({"itos": {0: "a"}, "stoi": {"a": 0}, "extra": {1, 2}}, "set"),  # no global needed for a set
    ({"itos": {0: b"a"}}, "bytes"),
    ({"itos": {"0": "a"}}, "int -> str"),
    ({"itos": {0: "a"}, "stoi": {"a": 1}}, "disagree"),
    (["a", "b"], "expected a dict"),
])
def test_meta_pkl_content_checked(tmp_path, meta, match):
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps(meta, protocol=4))
    with pytest.raises(CheckpointError, match=match):
        load_meta_pkl(path)


def test_meta_pkl_round_trip(tmp_path):
    meta = load_meta_pkl(write_meta(tmp_path / "meta.pkl"))
    assert meta["vocab_size"] == V and meta["itos"][2] == "!" and meta["stoi"]["a"] == 3


# ---- bad checkpoints ----

def test_corrupt_pt(tmp_path):
    src = tmp_path / "ckpt.pt"
    src.write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="corrupt"):
        convert(src, tmp_path / "ours", meta=write_meta(tmp_path / "m.pkl"))
    good = save_nanogpt(tmp_path / "good.pt", nanogpt_state(True), True)
    src.write_bytes(good.read_bytes()[:2000])  # truncated
    with pytest.raises(CheckpointError, match="corrupt"):
        convert(src, tmp_path / "ours", meta=write_meta(tmp_path / "m.pkl"))


def test_pickled_objects_are_not_loaded(tmp_path):
    src = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "model_args": argparse.Namespace(n_layer=1)}, src)
    with pytest.raises(CheckpointError, match="weights-only"):
        convert(src, tmp_path / "ours")


def test_bad_state_dicts_name_the_key(tmp_path):
    meta = write_meta(tmp_path / "m.pkl")
    sd = nanogpt_state(True)
    del sd["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.1\.mlp\.c_fc\.bias'"):
        convert(save_nanogpt(tmp_path / "a.pt", sd, True), tmp_path / "o", meta=meta)
    sd = nanogpt_state(True)
    sd["transformer.h.0.attn.c_proj.weight"] = torch.zeros(C, C + 1)
    with pytest.raises(CheckpointError, match=r"c_proj\.weight.*shape"):
        convert(save_nanogpt(tmp_path / "b.pt", sd, True), tmp_path / "o", meta=meta)
    sd = nanogpt_state(True)
    sd["transformer.h.2.ln_1.weight"] = torch.ones(C)  # a third block: model_args say 2
    with pytest.raises(CheckpointError, match=r"unexpected.*transformer\.h\.2\.ln_1\.weight"):
        convert(save_nanogpt(tmp_path / "c.pt", sd, True), tmp_path / "o", meta=meta)
    torch.save({"model": {"encoder.weight": torch.ones(2)}, "model_args": {}}, tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint layout.*encoder\.weight"):
        convert(tmp_path / "d.pt", tmp_path / "o", meta=meta)
    ckpt = torch.load(save_original(tmp_path / "e.pt", original_model(True), True), weights_only=True)
    del ckpt["model"]["transformer.layers.1.mha.heads.3.value.weight"]
    torch.save(ckpt, tmp_path / "e.pt")
    with pytest.raises(CheckpointError, match=r"'transformer\.layers\.1\.mha\.heads\.3\.value\.weight'"):
        convert(tmp_path / "e.pt", tmp_path / "o", meta=meta)
    assert not (tmp_path / "o").exists()


def test_cli_convert(tmp_path, capsys):
    src = save_nanogpt(tmp_path / "ckpt.pt", nanogpt_state(True), True)
    write_meta(tmp_path / "meta.pkl")
    parser = argparse.ArgumentParser(prog="mdi")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", str(src), "--out", str(tmp_path / "ours")])
    assert args.func(args) == 0
    assert "nanogpt" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="--force"):  # never silently overwrites
        args.func(args)
    args = parser.parse_args(["convert", str(src), "--out", str(tmp_path / "ours"), "--force"])
    assert args.func(args) == 0

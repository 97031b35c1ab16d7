"""Per-node chunks: split equals whole (uncached within 1e-5, cached bitwise, through
a context overflow), each chunk holds exactly its stage's tensors, and bad chunk
directories are refused with a message that says what is wrong."""
from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load

from mdi.checkpoint import CheckpointError, load_model, load_stage, save_checkpoint
from mdi.checkpoint.format import EMBEDDING, TIED_HEAD, build_stage, expected_shapes
from mdi.ring.plan.partition import Shard, even_split, shards_from_sizes
from mdi.checkpoint.chunks import CHUNK_FORMAT, load_chunk, read_chunk_info, shard_tensors
from mdi.checkpoint.stream import shard_bytes
from mdi.ring.cluster.split import write_chunks
from mdi.generate import local
from mdi.generate.schedule import SampleState, accept, plan_step
from mdi.model import GPT, GPTConfig, KVCache
from mdi.tokenizer import CharTokenizer

from conftest import scaled_random_model

torch.set_num_threads(1)

CONFIG = GPTConfig(vocab_size=40, block_size=16, n_layer=4, n_head=2, n_embd=32)

NODES = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    tok = CharTokenizer(list((string.ascii_letters + string.digits)[:CONFIG.vocab_size]))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), scaled_random_model(CONFIG), tok)


class Chunks:
    """n -> the chunk directories of an n-node split, written on first use."""

    def __init__(self, ckpt: Path, out: Path) -> None:
        self.ckpt, self.out, self.done = ckpt, out, {}

    def __getitem__(self, n: int) -> list[Path]:
        if n not in self.done:
            self.done[n] = write_chunks(self.ckpt, n, self.out / f"split{n}")
        return self.done[n]


@pytest.fixture(scope="module")
def chunks(ckpt, tmp_path_factory) -> Chunks:
    return Chunks(ckpt, tmp_path_factory.mktemp("chunks"))


@pytest.fixture(scope="module")
def whole(ckpt) -> GPT:
    return load_model(ckpt).model


def load_stages(dirs: list[Path]) -> list[GPT]:
    stages = []
    for d in dirs:
        info = read_chunk_info(d)
        stages.append(load_chunk(d, GPTConfig.from_dict(info["model"]), info["start"], info["stop"]))
    return stages


def ids(batch: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (batch, t), generator=torch.Generator().manual_seed(seed))


# --- chunk layout ------------------------------------------------------------------

@pytest.mark.parametrize("n", NODES)
def test_chunk_info_matches_even_split(chunks, ckpt, n):
    dirs = chunks[n]
    assert [d.name for d in dirs] == [f"node{i}" for i in range(n)]
    shards = even_split(CONFIG.n_layer, n)
    for i, (d, shard) in enumerate(zip(dirs, shards)):
        info = read_chunk_info(d)
        assert (info["start"], info["stop"]) == (shard.start, shard.stop)
        assert GPTConfig.from_dict(info["model"]) == CONFIG
        meta = json.loads((d / "config.json").read_text())
        assert meta["format"] == CHUNK_FORMAT and meta["node"] == i and meta["n_nodes"] == n
        # the starter's chunk carries the tokenizer (it owns the prompts and the text)
        assert (d / "tokenizer.json").is_file() == (i == 0)
        with safe_open(str(d / "model.safetensors"), framework="pt") as f:
            assert set(f.keys()) == set(expected_shapes(CONFIG, shard.start, shard.stop))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_shard_tensors_are_exactly_the_stage(ckpt, whole, n):
    full = whole.state_dict()
    for shard in even_split(CONFIG.n_layer, n):
        tensors = shard_tensors(ckpt, shard)
        want = expected_shapes(CONFIG, shard.start, shard.stop)
        assert set(tensors) == set(want)
        assert {k: tuple(v.shape) for k, v in tensors.items()} == want
        blocks = {int(k.split(".")[2]) for k in tensors if k.startswith("transformer.h.")}
        assert blocks == set(range(shard.start, shard.stop))
        assert (EMBEDDING in tensors) == shard.is_first
        assert (TIED_HEAD in tensors) == shard.is_last
        if shard.is_last:
            # the finisher's head is a copy of the tied embedding
            assert torch.equal(tensors[TIED_HEAD], full[EMBEDDING])
        for k, v in tensors.items():
            assert torch.equal(v, full[k]), k


@pytest.mark.parametrize("start,stop", [(3, 4), (0, 1), (1, 3),
                                        (0, 4)])
def test_shard_bytes_is_the_same_tensors(ckpt, start, stop):
    shard = Shard(start, stop, CONFIG.n_layer)
    got = st_load(shard_bytes(ckpt, shard))
    want = shard_tensors(ckpt, shard)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_write_chunks_with_a_manual_split(ckpt, tmp_path):
    dirs = write_chunks(ckpt, 2, tmp_path, shards=shards_from_sizes([3, 1]))
    assert [(read_chunk_info(d)["start"], read_chunk_info(d)["stop"]) for d in dirs] == [(0, 3), (3, 4)]


@pytest.mark.parametrize("n", [3, 4])
def test_load_stage_middle_range_equals_chunk(ckpt, chunks, n):
    for i, d in enumerate(chunks[n][1:-1], start=1):
        info = read_chunk_info(d)
        a, b = info["start"], info["stop"]
        assert 0 < a < b < CONFIG.n_layer  # a middle node: no embeddings, no head
        stage, _ = load_stage(ckpt, a, b)
        chunk = load_stages([d])[0]
        assert not stage.has_embeddings and not stage.has_head
        sd_stage, sd_chunk = stage.state_dict(), chunk.state_dict()
        assert set(sd_stage) == set(sd_chunk) == set(expected_shapes(CONFIG, a, b))
        for k in sd_stage:
            assert torch.equal(sd_stage[k], sd_chunk[k]), k


def test_load_chunk_dtype(chunks):
    d = chunks[2][1]
    info = read_chunk_info(d)
    stage = load_chunk(d, CONFIG, info["start"], info["stop"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in stage.parameters())


def test_load_chunk_with_the_wrong_range_is_refused(chunks):
    with pytest.raises(CheckpointError, match="missing tensor"):
        load_chunk(chunks[2][1], CONFIG, 0, 2)  # node1 holds blocks 2..3, not the embeddings


# --- split equals whole ------------------------------------------------------------

@pytest.mark.parametrize("n", NODES)
def test_split_equals_whole_uncached(chunks, whole, n):
    stages = load_stages(chunks[n])
    assert [(s.start, s.stop) for s in stages] == [(x.start, x.stop) for x in even_split(4, n)]
    x = ids(2, CONFIG.block_size, seed=n)
    with torch.no_grad():
        want = whole(x)
        h = x
        for i, stage in enumerate(stages):
            h = stage(h)
            if i < len(stages) - 1:
                assert h.shape == (2, CONFIG.block_size, CONFIG.n_embd)  # activations travel
    assert h.shape == want.shape == (2, CONFIG.block_size, CONFIG.vocab_size)
    torch.testing.assert_close(h, want, atol=1e-5, rtol=0)


def chain(stages: list[GPT], caches: list[KVCache], x: torch.Tensor, pos: torch.Tensor,
          logits: bool = True) -> torch.Tensor:
    """One cached forward through the ring: ids into stage 0, activations after."""
    for stage, cache in zip(stages, caches):
        x = stage(x, pos, cache, logits=logits)
    return x


def split_prefill(stages, caches, row: int, tokens: list[int]) -> None:
    """local.prefill, stage by stage."""
    idx = torch.tensor([tokens], dtype=torch.long)
    pos = torch.arange(len(tokens))[None]
    chain(stages, [c.rows(row, row + 1) for c in caches], idx, pos, logits=False)


def split_decode(stages, caches, tokens: list[int], positions: list[int]) -> torch.Tensor:
    """local.decode, stage by stage: logits (B, vocab)."""
    idx = torch.tensor(tokens, dtype=torch.long)[:, None]
    pos = torch.tensor(positions, dtype=torch.long)[:, None]
    return chain(stages, caches, idx, pos)[:, -1]


def greedy_run(prefill, decode, prompts: list[list[int]], n_tokens: int) -> list[torch.Tensor]:
    """Greedy generation for one group under the shared overflow policy; the logits of
    every decode step (B, vocab)."""
    states = [SampleState.from_prompt(p) for p in prompts]
    out = []
    for _ in range(n_tokens):
        plans = [plan_step(s, CONFIG.block_size) for s in states]
        for row, plan in enumerate(plans):
            if plan.prefill:
                prefill(row, plan.prefill)
        logits = decode([p.token for p in plans], [p.position for p in plans])
        out.append(logits.clone())
        for s, tok in zip(states, logits.argmax(-1).tolist()):
            accept(s, tok)
    return out


def realigned(model: GPT) -> GPT:
    """The same model with every parameter copied into a fresh (allocator-aligned) buffer."""
    for module in model.modules():
        for k, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[k] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
    if model.has_embeddings and model.has_head:
        model.lm_head.weight = model.transformer.wte.weight  # keep the tie
    return model


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of t whose data starts 4 bytes past a 64-byte boundary."""
    per = 64 // t.element_size()
    buf = torch.empty(t.numel() + 2 * per, dtype=t.dtype)
    start = (-(buf.data_ptr() // t.element_size()) + 1) % per
    out = buf[start:start + t.numel()].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 64 == t.element_size()
    return out


PROMPTS = [[7, 1, 30, 12, 3], [25, 0]]


def assert_cached_equal(stages: list[GPT], whole: GPT, prompts=PROMPTS,
                        n_tokens: int = CONFIG.block_size) -> None:
    """Greedy decode logits of the chained stages == the whole model's, bitwise.
    n_tokens = block_size takes sample 0 through a window jump and re-prefill."""
    with torch.inference_mode():
        wcache = whole.new_cache(len(prompts))
        want = greedy_run(lambda r, t: local.prefill(whole, wcache, r, t),
                          lambda t, p: local.decode(whole, wcache, t, p), prompts, n_tokens)
        caches = [s.new_cache(len(prompts)) for s in stages]
        got = greedy_run(lambda r, t: split_prefill(stages, caches, r, t),
                         lambda t, p: split_decode(stages, caches, t, p), prompts, n_tokens)
    assert len(got) == len(want) == n_tokens
    for step, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"step {step}: max |diff| {(g - w).abs().max().item():.3g}"
    # and the cached logits agree with an uncached forward of the same context
    with torch.no_grad():
        ref = whole(torch.tensor([prompts[1]]))[0, -1]
    torch.testing.assert_close(want[0][1], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_split_equals_whole_cached_bitwise(chunks, whole, n):
    """The cached path is batch- and split-invariant: the chunks of `mdi split`,
    chained, give bitwise the whole model's logits at every decode step."""
    assert_cached_equal(load_stages(chunks[n]), whole)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_split_equals_whole_cached_bitwise_realigned(chunks, ckpt, n):
    """The same comparison with every weight in a fresh buffer: the split itself is
    exact; only where the weights sit in memory changed the bits above."""
    assert_cached_equal([realigned(s) for s in load_stages(chunks[n])],
                        realigned(load_model(ckpt).model))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_load_stage_split_equals_whole_cached_bitwise(ckpt, whole, n):
    """Stages read from the same checkpoint file (same tensor offsets) are exact."""
    assert_cached_equal([load_stage(ckpt, s.start, s.stop)[0] for s in even_split(4, n)], whole)


def test_build_stage_output_does_not_depend_on_source_alignment(ckpt, whole):
    """Regression test for the fix: a stage built from misaligned tensors (as
    safetensors hands them out) computes exactly what one from aligned tensors does."""
    full = {k: v.detach().clone() for k, v in whole.state_dict().items()}
    aligned = build_stage(CONFIG, 2, 4, full.get)
    shifted = build_stage(CONFIG, 2, 4, lambda k: misaligned(full[k]) if k in full else None)
    x = torch.randn(2, 1, CONFIG.n_embd, generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[3], [5]])
    with torch.inference_mode():
        a = aligned(x, pos, aligned.new_cache(2))
        b = shifted(x, pos, shifted.new_cache(2))
    assert torch.equal(a, b), f"max |diff| {(a - b).abs().max().item():.3g}"


# --- bad chunk directories -----------------------------------------------------------

def copy_chunk(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_meta(d: Path, **changes) -> None:
    meta = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    (d / "config.json").write_text(json.dumps(meta))


def test_read_chunk_info_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json") as e:
        read_chunk_info(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_read_chunk_info_a_checkpoint_is_not_a_chunk(ckpt):
    with pytest.raises(CheckpointError, match="format field"):
        read_chunk_info(ckpt)


@pytest.mark.parametrize("changes,match", [
    (dict(format="mdi-checkpoint"), "format field"),
    (dict(format=None), "format field"),
    (dict(model=None), "model"),
    (dict(model={"n_layer": 4, "colour": "red"}), "colour"),
    (dict(start=None), "start"),
    (dict(stop=9), r"\[2, 9\)"),
    (dict(start=3, stop=2), r"\[3, 2\)"),
    (dict(start="0"), "str"),
])
def test_read_chunk_info_bad_meta(chunks, tmp_path, changes, match):
    d = copy_chunk(chunks[2][1], tmp_path / "node1")
    edit_meta(d, **changes)
    with pytest.raises(CheckpointError, match=match):
        read_chunk_info(d)


def test_read_chunk_info_invalid_json(chunks, tmp_path):
    d = copy_chunk(chunks[2][0], tmp_path / "node0")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_chunk_info(d)


def test_read_chunk_info_missing_weights(chunks, tmp_path):
    d = copy_chunk(chunks[2][0], tmp_path / "node0")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors") as e:
        read_chunk_info(d)
    assert str(d) in str(e.value)


def test_load_chunk_corrupt_weights(chunks, tmp_path):
    d = copy_chunk(chunks[2][0], tmp_path / "node0")
    (d / "model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{garbage")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_chunk(d, CONFIG, 0, 2)

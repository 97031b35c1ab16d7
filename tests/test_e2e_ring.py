"""End to end: real `mdi` processes on loopback.

Every distributed run here must print exactly what `mdi sample` prints for the
same checkpoint, prompts and seed: `mdi run` (it spawns its own nodes), and
`mdi starter` against long-lived `mdi node` processes that this module starts
from a nodes file in the original layout (DESIGN.md, "Configuration file"). The nodes stay
up across runs, models and ring sizes; their role comes from the starter's
/init, the role on their command line only locates their address.

All slow (select with `-m slow`). Tiny models (n_embd 32, block_size 32) and
one torch thread per process: the machine these run on may be a busy 2-core
box, where two spinning OpenMP threads per process cost 100x. Every command
runs under a timeout so a hang fails a test instead of blocking CI.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from cluster_helpers import TOKEN, Ring, child_env, health, mdi_cmd, start_nodes, status
from mdi.checkpoint import save_checkpoint
from mdi.ring.cluster.local_cluster import free_ports
from mdi.ring.cluster.nodes_config import NodeSpec
from mdi.ring.plan.partition import even_split
from mdi.ring.protocol.wire import HEADER_SIZE
from mdi.generate.schedule import make_groups
from mdi.ring.starter.options import lane_count
from mdi.model import GPT, GPTConfig
from mdi.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "data" / "tinyshakespeare.txt"
N_EMBD = 32
BLOCK_SIZE = 32
TIMEOUT = 120          # seconds for any one command
NODE_TIMEOUT = 10.0    # the nodes' --timeout (mdi node's default)
FLOAT32 = 4

# The usual generation: 3 samples of 30 tokens, sampled (the default settings).
STD = dict(n_samples=3, n_tokens=30, prompts=("ROMEO:",), temperature=0.8, top_k=200, seed=7)


# ---- processes (the shared harness: tests/cluster_helpers.py) -------------------
def mdi(*args, token: str | None = None, timeout: float = TIMEOUT,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**(child_env(MDI_TOKEN=token) if token is not None else child_env()), **(env or {})}
    try:
        return subprocess.run(mdi_cmd(*args), capture_output=True, text=True, timeout=timeout,
                              env=env, stdin=subprocess.DEVNULL, cwd=REPO)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`mdi {' '.join(map(str, args))}` hung for {timeout} s; stderr:\n{e.stderr}")


def mdi_json(*args, token: str | None = None, env: dict[str, str] | None = None
             ) -> tuple[dict, str]:
    """Run a generation command with --json; returns (parsed stdout, stderr)."""
    p = mdi(*args, "--json", token=token, env=env)
    assert p.returncode == 0, f"`mdi {' '.join(map(str, args))}` exited {p.returncode}:\n{p.stderr}"
    return json.loads(p.stdout), p.stderr


def gen_args(n_samples: int, n_tokens: int, prompts, temperature: float, top_k: int,
             seed: int) -> list[str]:
    out = ["--n-samples", n_samples, "--n-tokens", n_tokens, "--temperature", temperature,
           "--top-k", top_k, "--seed", seed, "--threads", 1,
           "--batch-invariant",  # distributed groupings differ from the single run's
           "--truncate", "left"]  # LONG_PROMPT: the window keeps its last tokens (checked here)
    for p in prompts:
        out += ["--prompt", p]
    return [str(a) for a in out]


DIST = ["--timeout", "30"]  # a busy CI box can be slower than the default 10 s of silence

_baselines: dict[tuple, dict] = {}


def sample(ckpt: Path, **gen) -> dict:
    """`mdi sample` (the single-device baseline), once per distinct set of options."""
    key = (str(ckpt), tuple(sorted(gen.items())))
    if key not in _baselines:
        _baselines[key], _ = mdi_json("sample", "--ckpt", ckpt, *gen_args(**gen))
    return _baselines[key]


def node_entry(ports: tuple[int, int, int], secondary: bool = True) -> dict:
    """One node of the original layout from (control, data in, data out) ports."""
    ctrl, port_in, port_out = ports
    comm = {"starter_addr": "127.0.0.1", "port": ctrl} if secondary else {"port": ctrl}
    return {"addr": "127.0.0.1", "communication": comm,
            "inference": {"port_in": port_in, "port_out": port_out}}


def original_nodes_file(path: Path, starter, intermediates=(), finisher=None) -> Path:
    nodes: dict = {"starter": node_entry(starter, secondary=False),
                   "intermediate": [node_entry(p) for p in intermediates]}
    if finisher is not None:
        nodes["finisher"] = node_entry(finisher)
    path.write_text(json.dumps({"nodes": nodes}, indent=2))
    return path


def three_ports() -> tuple[int, int, int]:
    return tuple(free_ports(3))  # type: ignore[return-value]


def ports_of(spec: NodeSpec) -> tuple[int, int, int]:
    return spec.port, spec.port_in, spec.port_out


def specs(ring: Ring) -> dict[str, NodeSpec]:
    return {n.spec.name: n.spec for n in ring.procs}


# ---- fixtures ------------------------------------------------------------------
def tiny_checkpoint(path: Path, tok: CharTokenizer, n_layer: int, seed: int) -> Path:
    """Random weights, scaled up from GPT-2's init so that the logits (and hence the
    sampled tokens) depend on the model, not only on the sampling generator."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=BLOCK_SIZE, n_layer=n_layer,
                       n_head=2, n_embd=N_EMBD)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return save_checkpoint(path, model.eval(), tok, {"note": "random weights for e2e tests"})


@pytest.fixture(scope="module")
def tokenizer() -> CharTokenizer:
    return CharTokenizer.train(SHAKESPEARE.read_text(encoding="utf-8")[:5000])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer) -> Path:
    """4 layers: 2 nodes hold 2+2, 3 nodes hold 1+2+1 (even split)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt4"), tokenizer, n_layer=4, seed=0)


@pytest.fixture(scope="module")
def ckpt3(tmp_path_factory, tokenizer) -> Path:
    """Another model (3 layers, other weights) for re-initialising the same nodes."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt3"), tokenizer, n_layer=3, seed=1)


@pytest.fixture(scope="module")
def ring3(tmp_path_factory):
    """Long-lived intermediate + finisher processes, nodes file in the original layout."""
    d = tmp_path_factory.mktemp("ring3")
    path = original_nodes_file(d / "nodes.json", three_ports(), [three_ports()], three_ports())
    ring = start_nodes(path, d, timeout=NODE_TIMEOUT)
    try:
        yield ring
    finally:
        ring.stop()


def assert_same_samples(dist: dict, base: dict) -> None:
    assert dist["samples"] == base["samples"]
    assert dist["n_samples"] == base["n_samples"]


def assert_hops(out: dict, names: list[str], group_sizes: set[int] | None = None) -> None:
    """`hops` goes once around the ring; with equal groups of size g every activation
    hop costs one header per frame of g samples plus n_embd float32 per sample."""
    hops = out["hops"]
    ring = names + [names[0]]
    assert [(h["from"], h["to"]) for h in hops] == list(zip(ring, ring[1:]))
    for h in hops[1:]:  # every node timed its frames: waiting, compute, the hop's own overhead
        assert h["frames"] > 0 and h["compute_us"] > 0
        assert h["wait_us"] >= 0 and h["overhead_us"] >= 0
    assert out["hop_overhead_us"] > 0
    if group_sizes is not None and len(group_sizes) == 1:
        (g,) = group_sizes
        want = HEADER_SIZE / g + N_EMBD * FLOAT32
        assert out["bytes_per_hop_per_token"] == pytest.approx(want, abs=1e-3)
        for h in hops:  # the way back carries one int64 token id per sample
            per_sample = N_EMBD * FLOAT32 if h["to"] != "starter" else 8
            assert h["bytes_per_token"] == pytest.approx(HEADER_SIZE / g + per_sample, abs=1e-3)


# ---- 1. mdi run == mdi sample --------------------------------------------------
@pytest.mark.slow
# each node count and each link once, greedy and sampled both (the suite's time: every
# case starts a ring of processes)
@pytest.mark.parametrize("n_nodes,temperature,link", [
    (2, 0.0, "unix"), (3, 0.8, "unix"), (4, 0.0, "unix"), (3, 0.8, "tcp")])
def test_run_equals_sample_past_block_size(ckpt, n_nodes, temperature, link):
    # 80 new tokens with block_size 32: the context overflows (window + re-prefill)
    # several times; 6 samples make equal groups for 2 and 3 nodes (3+3, 2+2+2),
    # unequal ones for 4 (2+2+1+1, one layer per node). Local nodes link over Unix
    # sockets unless MDI_LOCAL_LINKS=0 (ring/local_link.py): both transports give
    # the same samples.
    gen = dict(n_samples=6, n_tokens=80, prompts=("ROMEO:",), temperature=temperature,
               top_k=200, seed=1234)
    base = sample(ckpt, **gen)
    out, _ = mdi_json("run", "--ckpt", ckpt, "--nodes", n_nodes, *DIST, *gen_args(**gen),
                      env={"MDI_LOCAL_LINKS": "0"} if link == "tcp" else None)
    assert {h["link"] for h in out["hops"]} == {link}
    assert_same_samples(out, base)
    assert all(len(s) == 80 for s in out["samples"])
    assert out["mode"] == "distributed" and out["n_nodes"] == n_nodes
    names = ["starter"] + [f"intermediate[{i}]" for i in range(n_nodes - 2)] + ["finisher"]
    # local nodes share this machine's cores: as many lanes as can compute at once
    parallel = out["plan"]["parallel_stages"]
    assert parallel == min(n_nodes, len(os.sched_getaffinity(0)))
    assert_hops(out, names, {len(g) for g in make_groups(6, lane_count(n_nodes, None, parallel))})


# ---- 2. mdi starter against long-lived nodes -----------------------------------
@pytest.mark.slow
def test_starter_twice_on_the_same_nodes(ckpt, ring3):
    base = sample(ckpt, **STD)
    lanes = ["--micro-batches", "3"]  # whatever the cores: one sample per lane
    first, log = mdi_json("starter", "--ckpt", ckpt, "--nodes-config", ring3.nodes_path, *DIST,
                          *lanes, *gen_args(**STD), token=TOKEN)
    assert_same_samples(first, base)
    assert "weights uploaded" in log
    # 3 samples on 3 nodes: three groups of one sample
    assert_hops(first, ["starter", "intermediate[0]", "finisher"], {1})
    assert first["bytes_per_hop_per_token"] == HEADER_SIZE + N_EMBD * FLOAT32

    done = {name: status(u)["runs_completed"] for name, u in specs(ring3).items()}
    second, _ = mdi_json("starter", "--ckpt", ckpt, "--nodes-config", ring3.nodes_path, *DIST,
                         *lanes, *gen_args(**STD), token=TOKEN)
    assert second["samples"] == first["samples"]
    for name, u in specs(ring3).items():
        st = status(u)
        assert st["runs_completed"] == done[name] + 1, st
        assert st["state"] == "idle" and st["run_id"] is None, st
    ring3.assert_alive()


@pytest.mark.slow
def test_same_nodes_other_ring_and_model(ckpt, ckpt3, ring3, tmp_path):
    # A 2-node ring whose finisher is the running finisher process; the intermediate
    # process sits this run out. Another model (3 layers): the finisher re-inits.
    two = original_nodes_file(tmp_path / "two.json", three_ports(), [],
                              ports_of(ring3.config.finisher))
    base3 = sample(ckpt3, **STD)
    out, log = mdi_json("starter", "--ckpt", ckpt3, "--nodes-config", two, *DIST, *gen_args(**STD),
                        token=TOKEN)
    assert_same_samples(out, base3)
    assert out["n_nodes"] == 2
    fin = even_split(3, 2)[1]
    assert f"finisher at 127.0.0.1:{ring3.config.finisher.port}: layers [{fin.start}, {fin.stop})" in log
    assert_hops(out, ["starter", "finisher"], {2, 1})
    assert out["samples"] != sample(ckpt, **STD)["samples"]  # another model, other text

    # The role comes from /init: the process started as `--role intermediate` serves
    # as this ring's finisher (layers, head and sampling).
    swapped = original_nodes_file(tmp_path / "swapped.json", three_ports(), [],
                                  ports_of(ring3.config.intermediate[0]))
    out, _ = mdi_json("starter", "--ckpt", ckpt3, "--nodes-config", swapped, *DIST,
                      *gen_args(**STD), token=TOKEN)
    assert_same_samples(out, base3)

    # ... and back to the 3-node ring and the first model.
    again, _ = mdi_json("starter", "--ckpt", ckpt, "--nodes-config", ring3.nodes_path, *DIST,
                        *gen_args(**STD), token=TOKEN)
    assert_same_samples(again, sample(ckpt, **STD))
    ring3.assert_alive()


# ---- 3. S < N, S > N, several prompts ------------------------------------------
LONG_PROMPT = "First Citizen: Before we proceed any further, hear me speak."  # > block_size


@pytest.mark.slow
def test_one_sample_on_three_nodes(ckpt):
    gen = dict(STD, n_samples=1, prompts=("MENENIUS:",))
    out, _ = mdi_json("run", "--ckpt", ckpt, "--nodes", 3, *DIST, *gen_args(**gen))
    assert_same_samples(out, sample(ckpt, **gen))
    assert_hops(out, ["starter", "intermediate[0]", "finisher"], {1})


@pytest.mark.slow
def test_five_prompts_on_two_nodes(ckpt):
    # one prompt per sample, one of them longer than block_size, one a single character
    prompts = ("ROMEO:", "A", LONG_PROMPT, "Citizen", "\n")
    gen = dict(STD, n_samples=5, prompts=prompts)
    base = sample(ckpt, **gen)
    assert len(set(base["samples"])) == 5
    out, _ = mdi_json("run", "--ckpt", ckpt, "--nodes", 2, *DIST, *gen_args(**gen))
    assert_same_samples(out, base)
    assert_hops(out, ["starter", "finisher"], {3, 2})


@pytest.mark.slow
def test_prompt_file_with_starter(ckpt, ring3, tmp_path):
    lines = ["ROMEO:", "CORIOLANUS: Hear me, friends!", LONG_PROMPT, "What"]
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # blank line skipped
    gen = dict(STD, n_samples=4, prompts=(f"FILE:{pfile}",))
    base = sample(ckpt, **gen)
    # the file is one prompt per sample: same as giving them one by one
    assert base["samples"] == sample(ckpt, **dict(gen, prompts=tuple(lines)))["samples"]
    out, _ = mdi_json("starter", "--ckpt", ckpt, "--nodes-config", ring3.nodes_path, *DIST,
                      *gen_args(**gen), token=TOKEN)
    assert_same_samples(out, base)


# ---- 4. pre-split chunks -------------------------------------------------------
@pytest.mark.slow
def test_split_chunks_are_not_uploaded(ckpt, tmp_path):
    chunks = tmp_path / "chunks"
    p = mdi("split", "--ckpt", ckpt, "--nodes", 3, "--out", chunks)
    assert p.returncode == 0, p.stderr
    assert [Path(line).name for line in p.stdout.split()] == ["node0", "node1", "node2"]

    path = original_nodes_file(tmp_path / "nodes.json", three_ports(), [three_ports()],
                               three_ports())
    nodes = start_nodes(path, tmp_path, timeout=NODE_TIMEOUT,
                        chunks=[chunks / "node1", chunks / "node2"])
    try:
        inter, fin = nodes.config.secondaries
        # each node announces the chunk it holds: the even split of 4 layers over 3 nodes
        for u, shard in zip((inter, fin), even_split(4, 3)[1:]):
            chunk = health(u)["chunk"]
            assert (chunk["start"], chunk["stop"]) == (shard.start, shard.stop), chunk
        out, log = mdi_json("starter", "--ckpt", ckpt, "--nodes-config", path, *DIST,
                            *gen_args(**STD), token=TOKEN)
        assert_same_samples(out, sample(ckpt, **STD))
        assert log.count("weights from its local chunk") == 2, log
        assert "uploaded" not in log
        for u in (inter, fin):
            assert status(u)["runs_completed"] == 1
    finally:
        nodes.stop()


# ---- 6. one node ---------------------------------------------------------------
@pytest.mark.slow
def test_single_node_starter_and_run(ckpt, tmp_path):
    base = sample(ckpt, **STD)
    path = original_nodes_file(tmp_path / "one.json", three_ports())
    out, _ = mdi_json("starter", "--ckpt", ckpt, "--nodes-config", path, *DIST, *gen_args(**STD),
                      token="unused-by-one-node")
    assert_same_samples(out, base)
    assert out["n_nodes"] == 1 and out["hops"] == []
    out, _ = mdi_json("run", "--ckpt", ckpt, "--nodes", 1, *DIST, *gen_args(**STD))
    assert_same_samples(out, base)
    assert out["n_nodes"] == 1


# ---- 7. wrong token --------------------------------------------------------------
@pytest.mark.slow
def test_wrong_token_is_one_clear_line(ckpt, ring3):
    p = mdi("starter", "--ckpt", ckpt, "--nodes-config", ring3.nodes_path, *DIST, "--json",
            *gen_args(**STD), token="not-the-cluster-token")
    assert p.returncode != 0
    assert p.stdout == ""
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("mdi starter: error: ") and "token" in lines[0], lines[0]
    # nothing changed on the nodes, and they still serve the right token
    for u in specs(ring3).values():
        assert status(u)["state"] == "idle"
    ring3.assert_alive()

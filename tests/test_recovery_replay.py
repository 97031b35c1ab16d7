"""Recovery by upstream replay (`--recovery replay`) on real rings of processes on
loopback, with the bundled model: a node is SIGKILLed at a random token, a spare
takes its layers, the survivors keep their stage and KV cache (no upload, no
re-prefill), the node before the spare replays its log. Greedy text equals the
undisturbed run's: intermediate killed (the starter replays), finisher killed (an
intermediate replays), and the second of two intermediates killed. Without a
spare, or with the starter's log gone, the ring is formed anew (reprefill), as
before; a checkpoint whose context overflows (a window jump between the kept
positions and the loss) also heals to the undisturbed text.
"""
from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest

from cluster_helpers import TEXT, health, resume_all
from conftest import scaled_random_model
from mdi.checkpoint import load_model
from mdi.checkpoint.format import save_checkpoint
from mdi.generate import SamplingConfig, generate
from mdi.model import GPTConfig
from mdi.model.quant import configure_stage
from mdi.ring.cluster.local_cluster import LocalCluster
from mdi.ring.starter.driver import Starter
from mdi.ring.starter.options import RunOptions
from mdi.tokenizer import CharTokenizer

pytestmark = pytest.mark.slow
BUNDLED = Path(__file__).resolve().parent.parent / "models" / "shakespeare-char"
GREEDY = SamplingConfig(temperature=0.0, top_k=None, seed=1)
LINES = ["ROMEO:\nBut soft", "First Citizen:\nWe are accounted poor citizens, the patricians good.",
         "KING", "JULIET:\nO Romeo, Romeo! wherefore art thou"]
N_TOKENS = 50


def undisturbed(ckpt: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    model = load_model(str(ckpt)).model
    configure_stage(model, None, batch_invariant=True)
    return [generate(model, [p], n, GREEDY)[0] for p in prompts]


@pytest.fixture(scope="module")
def bundled():
    tok = load_model(str(BUNDLED)).tokenizer
    prompts = [tok.encode(line) for line in LINES]
    return prompts, undisturbed(BUNDLED, prompts, N_TOKENS)


def run_killed(ckpt: Path, prompts, nodes: int, spares: int, victim: str, at: int,
               n_tokens: int = N_TOKENS, recovery: str = "replay"):
    with LocalCluster(nodes, threads=1, node_timeout=3.0, spares=spares) as c:
        pids = {spec.name: pid for spec, pid in zip(c.members, c.pids)}
        made = 0

        def on_event(i, ev) -> None:
            nonlocal made
            made += 1
            if made == at:
                os.kill(pids[victim], signal.SIGKILL)

        opts = RunOptions(timeout=3.0, batch_invariant=True, recovery=recovery)
        try:
            result = Starter(c.nodes, c.token, str(ckpt), opts, on_event=on_event).run(
                prompts, n_tokens, GREEDY)
        finally:
            resume_all(pids.values())
        states = {s.name: health(s)["state"] for s in c.nodes.ring[1:] + list(c.nodes.spares)
                  if s.name != victim}
    return result, states


@pytest.mark.parametrize("nodes,victim,ring", [
    (3, "intermediate[0]", ["starter", "spare[0]", "finisher"]),
    (3, "finisher", ["starter", "intermediate[0]", "spare[0]"]),
    (4, "intermediate[1]", ["starter", "intermediate[0]", "spare[0]", "finisher"])])
def test_lost_node_healed_by_replay_gives_the_undisturbed_text(bundled, nodes, victim, ring):
    prompts, want = bundled
    at = random.Random().randrange(len(prompts), N_TOKENS * len(prompts) // 2)
    result, states = run_killed(BUNDLED, prompts, nodes, 1, victim, at)
    assert result.tokens == want, f"killed at token {at}"
    assert result.failure is None
    (rec,) = result.recoveries
    assert rec["failed"].startswith(f"{victim} at "), rec
    assert rec["recovery"] == "replay" and rec["ring"] == ring, rec
    assert [n["node"] for n in rec["plan"]["nodes"]] == ring
    assert rec["plan"]["replayed_slots"] > 0 and rec["plan"]["replayed_positions"] > 0
    assert set(states.values()) == {"idle"}, states  # STOP went round the healed ring


def test_without_a_spare_the_ring_is_formed_anew(bundled):
    prompts, want = bundled
    result, _ = run_killed(BUNDLED, prompts, 3, 0, "intermediate[0]", 30)
    assert result.tokens == want
    (rec,) = result.recoveries
    assert rec["recovery"] == "reprefill" and rec["ring"] == ["starter", "finisher"]


def test_replay_across_a_context_overflow(tmp_path):
    """block_size 32 and 60 tokens: sequences jump their window (a re-prefill from 0)
    around the loss; what every stage holds for certain follows the window."""
    tok = CharTokenizer.train(TEXT)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=4, n_head=2, n_embd=32)
    ckpt = save_checkpoint(tmp_path, scaled_random_model(config, seed=5), tok, {"note": "replay"})
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    want = undisturbed(ckpt, prompts, 60)
    at = random.Random().randrange(5, 60 * len(prompts) // 2)
    result, _ = run_killed(ckpt, prompts, 3, 1, "intermediate[0]", at, n_tokens=60)
    assert result.tokens == want, f"killed at token {at}"
    (rec,) = result.recoveries
    assert rec["recovery"] == "replay", rec

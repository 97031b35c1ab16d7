"""`mdi bench`: a matrix of configurations run side by side, several times each.

Every configuration of one invocation lives in one process tree: the clusters
of all node counts are started first and stay up (idle nodes block on their
sockets), then the runs interleave configuration by configuration, so slow
phases of a noisy machine hit all of them alike. Each generation runs as its
own worker process (mdi.bench.worker) so its peak RSS and CPU time are its
own; secondary nodes are measured through /proc.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from tqdm import tqdm

from ..checkpoint import open_checkpoint
from ..model.cache import context_length
from ..ring.protocol.auth import ENV_VAR
from ..ring.cluster.local_cluster import LocalCluster, child_setup
from .cgroup import CpuCaps, MemCaps, quota_us
from .latency import LATENCY_FIELDS
from .models import random_checkpoint
from .report import fused_column
from .netns import NetnsHosts

log = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    ckpt: str | None = None
    model_size: str | None = None
    nodes: list[int] = field(default_factory=lambda: [1, 2, 3])
    n_samples: int = 3
    n_tokens: int = 500
    runs: int = 5
    out: str = "bench-out"
    isolate: bool = False
    hosts: str = "local"
    link_rate: str | None = None
    resend_context: bool = False
    quantize: str | None = None       # every configuration of the invocation, on every node
    batch_invariant: bool = False
    max_context: int | None = None    # positions a sequence keeps (None: the default cap)
    seed: int = 1337
    run_timeout: float = 1800.0
    node_cpu: list[float] | None = None       # CPU share per node, starter first (cgroup v1)
    node_mem: list[int] | None = None         # memory limit per node in bytes, starter first
    partitions: list[str] = field(default_factory=list)  # "auto", "even"; [] = the starter's default
    micro_batches: int | None = None  # lanes on the ring (None: the starter's default)
    prompt_tokens: list[int] = field(default_factory=list)   # prompt lengths; [] = one newline
    prefill_chunks: list[int] = field(default_factory=list)  # side by side; [] = the default
    join_prefills: list[str] = field(default_factory=list)  # "batched", "each" side by side
    temperature: float = 0.8          # 0: greedy (tokens comparable across configurations)
    slow_at: tuple[int, int, float] | None = None  # (token, node, share): a node slowed mid-run
    replans: list[str] = field(default_factory=list)  # "on", "off" side by side; [] = default

    def __post_init__(self) -> None:
        if (self.ckpt is None) == (self.model_size is None):
            raise ValueError("give exactly one of --ckpt and --model-size")
        if not self.nodes or any(n < 1 for n in self.nodes):
            raise ValueError(f"--nodes must list positive node counts, got {self.nodes}")
        for name in ("n_samples", "n_tokens", "runs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.hosts not in ("local", "netns"):
            raise ValueError(f"--hosts must be local or netns, got {self.hosts!r}")
        if self.link_rate and self.hosts != "netns":
            raise ValueError("--link-rate needs --hosts netns")
        bad = [p for p in self.partitions if p not in ("auto", "even")]
        if bad or len(set(self.partitions)) != len(self.partitions):
            raise ValueError(f"--partition must list auto and/or even once each, got "
                             f"{','.join(self.partitions)}")
        for name, flag, low in (("prompt_tokens", "--prompt-tokens", 1),
                                ("prefill_chunks", "--prefill-chunk", 0)):
            xs = getattr(self, name)
            if any(x < low for x in xs) or len(set(xs)) != len(xs):
                raise ValueError(f"{flag} must list distinct counts of at least {low}, got "
                                 f"{','.join(map(str, xs))}")
        if any(j not in ("batched", "each") for j in self.join_prefills):
            raise ValueError(f"join_prefills must list batched and/or each, got {self.join_prefills}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be 0 or positive, got {self.temperature:g}")
        if self.node_cpu is not None and len(self.node_cpu) < max(self.nodes):
            raise ValueError(f"--node-cpu gives {len(self.node_cpu)} share(s); --nodes "
                             f"{max(self.nodes)} needs one per node, starter first")
        if any(r not in ("on", "off") for r in self.replans) or \
                len(set(self.replans)) != len(self.replans):
            raise ValueError(f"--replan must list on and/or off once each, got {self.replans}")
        if self.slow_at is not None and (self.node_cpu is None
                                         or self.slow_at[1] >= min(self.nodes)):
            raise ValueError("--slow-at needs --node-cpu (the node's CPU group) and a node "
                             f"below every --nodes count, got node {self.slow_at[1]}")
        if self.node_mem is not None and len(self.node_mem) < max(self.nodes):
            raise ValueError(f"--node-mem gives {len(self.node_mem)} limit(s); --nodes "
                             f"{max(self.nodes)} needs one per node, starter first")


@dataclass(frozen=True)
class Variant:
    n_nodes: int
    resend: bool
    partition: str = ""   # "", "auto" or "even" (distributed variants only)
    prefill_chunk: int | None = None  # None: the default (not in the name)
    prompt_tokens: int | None = None  # None: the one-newline prompt (not in the name)
    join_prefill: str | None = None   # "batched" | "each" (worker --join-prefill); None: default
    replan: str | None = None         # "on" | "off" (worker --replan); None: the default

    @property
    def series(self) -> str:
        """The name without the prompt length: one line of a by-prompt-length plot."""
        base = "single" if self.n_nodes == 1 else (
            f"mdi-{self.n_nodes}" + ("-resend" if self.resend else "")
            + (f"-{self.partition}" if self.partition else ""))
        return (base + ("" if self.prefill_chunk is None else f"-chunk{self.prefill_chunk}")
                + ("" if self.join_prefill is None else f"-join-{self.join_prefill}")
                + ("" if self.replan is None else f"-replan-{self.replan}"))

    @property
    def name(self) -> str:
        return self.series + ("" if self.prompt_tokens is None else f"-p{self.prompt_tokens}")

    @property
    def mode(self) -> str:
        return "single" if self.n_nodes == 1 else ("resend-context" if self.resend else "kv-cache")


def variants(cfg: BenchConfig) -> list[Variant]:
    """Every configuration: node counts x partitions (x resend), each at every prompt
    length and prefill chunk (the resend-context loop has no chunks)."""
    parts = cfg.partitions or [""]
    ns = sorted(set(cfg.nodes))
    chunks: list[int | None] = list(cfg.prefill_chunks) or [None]
    lens: list[int | None] = list(cfg.prompt_tokens) or [None]
    joins: list[str | None] = list(cfg.join_prefills) or [None]
    replans: list[str | None] = list(cfg.replans) or [None]
    out = [Variant(n, False, p, c, t, j, r if n > 1 else None) for t in lens for n in ns
           for p in (parts if n > 1 else [""]) for c in chunks for j in joins
           for r in (replans if n > 1 else [None])]
    if cfg.resend_context:
        out += [Variant(n, True, p, None, t) for t in lens for n in ns if n > 1 for p in parts]
    return out


def core_plan(n_nodes: int, isolate: bool, max_nodes: int) -> list[list[int]] | None:
    """CPUs per node when isolating: each node its own core(s); the single-device
    run gets as many cores as the largest cluster of the matrix uses in total."""
    if not isolate:
        return None
    cores = sorted(os.sched_getaffinity(0))
    per = len(cores) // max_nodes
    if per < 1:
        raise ValueError(f"--isolate: {max_nodes} nodes need at least {max_nodes} cores, "
                         f"this machine has {len(cores)}")
    if n_nodes == 1:
        return [cores[: per * max_nodes]]
    return [cores[i * per:(i + 1) * per] for i in range(n_nodes)]


def threads_for(n_nodes: int, isolate: bool, max_nodes: int) -> int:
    cores = len(os.sched_getaffinity(0))
    if isolate:
        per = cores // max_nodes
        return per * max_nodes if n_nodes == 1 else per
    return max(1, cores // n_nodes)


def replan_fields(res: dict, cfg: BenchConfig) -> dict:
    """A run's re-plans and recoveries, and its tokens/s over the last half of its steps
    (with --slow-at: the stretch after the slow-down, once a re-plan had its chance)."""
    recs = res.get("recoveries") or []
    t, half = res["step_times"], len(res["step_times"]) // 2
    tail = (cfg.n_samples * (len(t) - 1 - half) / (t[-1] - t[half])
            if half and t[-1] > t[half] else float("nan"))
    return {"slow_at": ":".join(f"{x:g}" for x in cfg.slow_at) if cfg.slow_at else "",
            "tail_tokens_per_s": round(tail, 2),
            "replans": sum(r.get("recovery") == "replan" for r in recs),
            "paused_s": round(sum(r.get("paused_s") or r.get("recovery_s") or 0 for r in recs), 3),
            "moved": ";".join(f"{m['layers'][0]}-{m['layers'][1]}:{m['from']}>{m['to']}"
                              for r in recs for m in r.get("moved") or [])}


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


class Bench:
    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt = cfg.ckpt or str(random_checkpoint(cfg.model_size, self.out / "models"))
        self.info = open_checkpoint(self.ckpt)
        self.variants = variants(cfg)
        context = context_length(self.info.config.block_size, cfg.max_context)
        if cfg.prompt_tokens and max(cfg.prompt_tokens) >= context:
            raise ValueError(f"--prompt-tokens {max(cfg.prompt_tokens)} leaves no room for a new "
                             f"token in the context of {context} positions (raise --max-context, "
                             f"at most the model's {self.info.config.block_size})")
        self.max_nodes = max(v.n_nodes for v in self.variants)
        self.caps: CpuCaps | None = None
        self.mem: MemCaps | None = None

    def run(self) -> list[dict]:
        rows: list[dict] = []
        with contextlib.ExitStack() as stack:
            hosts = None
            if self.cfg.hosts == "netns":
                hosts = stack.enter_context(NetnsHosts(self.max_nodes, self.cfg.link_rate))
            self.caps = None
            if self.cfg.node_cpu is not None:
                self.caps = stack.enter_context(CpuCaps(self.cfg.node_cpu[:self.max_nodes]))
            self.mem = None
            if self.cfg.node_mem is not None:
                self.mem = stack.enter_context(MemCaps(self.cfg.node_mem[:self.max_nodes]))
            clusters: dict[int, LocalCluster] = {}
            for n in sorted({v.n_nodes for v in self.variants if v.n_nodes > 1}):
                clusters[n] = stack.enter_context(LocalCluster(
                    n, threads=threads_for(n, self.cfg.isolate, self.max_nodes),
                    node_timeout=60.0, affinity=core_plan(n, self.cfg.isolate, self.max_nodes),
                    addrs=hosts.addrs[:n] if hosts else None,
                    prefixes=[hosts.prefix(i) for i in range(n)] if hosts else None))
                for i, proc in enumerate(clusters[n].procs, start=1):
                    if self.caps is not None:  # node i of this cluster gets share i
                        self.caps.join(i, proc.pid)
                    if self.mem is not None:  # and a memory group of its own
                        self.mem.join(f"ring{n}-node{i}", i, proc.pid)
            total = self.cfg.runs * len(self.variants)
            with tqdm(total=total, unit="run", desc="bench", disable=None) as bar:
                for r in range(self.cfg.runs):
                    for v in self.variants:
                        bar.set_postfix_str(v.name)
                        rows.append(self._one(v, r, clusters.get(v.n_nodes), hosts))
                        bar.update(1)
        return rows

    def _worker_cmd(self, v: Variant, run: int, cluster: LocalCluster | None) -> list[str]:
        """The worker's command line for one run of configuration v."""
        cfg = self.cfg
        cmd = [sys.executable, "-m", "mdi.bench.worker", "--ckpt", str(Path(self.ckpt).resolve()) if Path(self.ckpt).exists() else self.ckpt,
               "--n-samples", str(cfg.n_samples), "--n-tokens", str(cfg.n_tokens),
               "--threads", str(threads_for(v.n_nodes, cfg.isolate, self.max_nodes)),
               "--seed", str(cfg.seed + run)]
        if cfg.quantize:
            cmd += ["--quantize", cfg.quantize]
        if cfg.batch_invariant:
            cmd.append("--batch-invariant")
        if cfg.max_context is not None:
            cmd += ["--max-context", str(cfg.max_context)]
        if v.prompt_tokens is not None:
            cmd += ["--prompt-tokens", str(v.prompt_tokens)]
        if v.prefill_chunk is not None:
            cmd += ["--prefill-chunk", str(v.prefill_chunk)]
        if v.join_prefill is not None:
            cmd += ["--join-prefill", v.join_prefill]
        cmd += ["--temperature", f"{cfg.temperature:g}"]
        if cfg.micro_batches is not None and cluster is not None:
            cmd += ["--micro-batches", str(cfg.micro_batches)]
        if v.replan is not None:
            cmd += ["--replan", v.replan]
        if cfg.slow_at is not None and self.caps is not None:
            token, node, share = cfg.slow_at
            cmd += ["--slow-at", f"{token}:{self.caps.quota_file(node)}:{quota_us(share)}"]
        if cluster is not None:
            cmd += ["--nodes-config", str(cluster.dir / "nodes.json")]
            if v.resend:
                cmd.append("--resend-context")
            if v.partition:
                cmd += ["--partition", v.partition]
        return cmd

    def _keep_log(self, name: str, err: bytes) -> None:
        """What a run warned of (re-plans, moves, recoveries): OUT/logs/NAME.txt."""
        (self.out / "logs").mkdir(exist_ok=True)
        (self.out / "logs" / f"{name}.txt").write_bytes(err)

    def _one(self, v: Variant, run: int, cluster: LocalCluster | None,
             hosts: NetnsHosts | None) -> dict:
        cfg = self.cfg
        cmd = self._worker_cmd(v, run, cluster)
        env = {**os.environ, **({ENV_VAR: cluster.token} if cluster is not None else {})}
        if hosts is not None:
            cmd = hosts.prefix(0) + cmd
        cpus = core_plan(v.n_nodes, cfg.isolate, self.max_nodes)
        if cfg.slow_at is not None and self.caps is not None:
            self.caps.restore()  # the last run slowed a node
        node_pids = [p.pid for p in cluster.procs] if cluster else []
        cpu_before = [_cpu_s(p) for p in node_pids]
        setup = child_setup(cpus[0] if cpus else None)
        if self.caps is not None:  # the starter (or single device) gets share 0
            base, caps = setup, self.caps

            def setup() -> None:
                base()
                caps.join_self(0)
        if self.mem is not None:  # and node 0's memory limit, in a group of this run's own
            group = self.mem.group(f"{v.name}-run{run}", 0) / "cgroup.procs"
            base_mem = setup

            def setup() -> None:
                base_mem()
                group.write_text(str(os.getpid()))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                preexec_fn=setup)
        try:
            out, err = proc.communicate(timeout=cfg.run_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise RuntimeError(f"{v.name} run {run} took longer than {cfg.run_timeout:g} s")
        if proc.returncode != 0:
            raise RuntimeError(f"{v.name} run {run} failed:\n{err.decode(errors='replace')[-2000:]}")
        res = json.loads(out)
        self._keep_log(f"{v.name}-run{run}", err)
        if (res.get("plan") or {}).get("partition") == "auto":  # the probes' figures, for the log
            log.info("%s run %d: plan %s", v.name, run, json.dumps(res["plan"]["nodes"]))
        rss = [res["peak_rss_mb"]] + [_peak_rss_mb(p) for p in node_pids]
        cpu = [res["cpu_s"]] + [_cpu_s(p) - b for p, b in zip(node_pids, cpu_before)]
        c = self.info.config
        row = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": v.name, "mode": v.mode,
               "n_nodes": v.n_nodes, "n_samples": cfg.n_samples, "n_layer": c.n_layer,
               "n_embd": c.n_embd, "block_size": c.block_size,
               "params": self.params(), "n_tokens": cfg.n_tokens, "isolate": cfg.isolate,
               "quantize": cfg.quantize or "", "batch_invariant": cfg.batch_invariant,
               "hosts": cfg.hosts, "link_rate": cfg.link_rate or "", "run": run,
               "links": "/".join(h.get("link") or "?" for h in res.get("hops") or []),
               "partition": (res.get("plan") or {}).get("partition", ""),
               "layers": "+".join("0" if n["layers"] is None else  # 0: a node left out
                                  str(n["layers"][1] - n["layers"][0])
                                  for n in (res.get("plan") or {}).get("nodes", [])),
               "stage_ms": "/".join("-" if n.get("ms_per_step") is None
                                    else f"{n['ms_per_step']:.2f}"
                                    for n in (res.get("plan") or {}).get("nodes", [])),
               "fused_kernels": fused_column(res.get("plan")),
               "node_cpu": ",".join(f"{x:g}" for x in cfg.node_cpu[:v.n_nodes])
               if cfg.node_cpu else "",
               "node_mem_mb": ",".join(str(x >> 20) for x in cfg.node_mem[:v.n_nodes])
               if cfg.node_mem else "",
               "gen_time_s": res["gen_time_s"], "tokens_per_s": res["tokens_per_s"],
               "first_token_s": res["first_token_s"],
               "bytes_per_hop_per_token": res.get("bytes_per_hop_per_token", 0.0),
               "hop_overhead_us": res.get("hop_overhead_us", 0.0),
               "tokens_total": res["tokens_total"], "step_times": res["step_times"],
               "series": v.series, "prompt_tokens": res["prompt_tokens"],
               "prefill_chunk": "" if v.prefill_chunk is None else v.prefill_chunk,
               "temperature": cfg.temperature, "tokens_sha": res["tokens_sha"],
               "replan": v.replan or "", **replan_fields(res, cfg),
               **{k: res[k] for k in LATENCY_FIELDS}}
        hops = res.get("hops") or []
        last = max((h.get("ring", 0) for h in hops), default=0)  # after a re-plan: the last ring's
        hops = [h for h in hops if h.get("ring", 0) == last]
        for i in range(self.max_nodes):
            row[f"hop_us_node{i}"] = hops[i].get("overhead_us", "") if i < len(hops) else ""
            row[f"peak_rss_mb_node{i}"] = round(rss[i], 1) if i < len(rss) else ""
            row[f"cpu_s_node{i}"] = round(cpu[i], 3) if i < len(cpu) else ""
        return row

    def params(self) -> int:
        c = self.info.config
        per_block = 12 * c.n_embd ** 2 + (13 * c.n_embd if c.bias else 0)
        return c.vocab_size * c.n_embd + c.block_size * c.n_embd + c.n_layer * per_block

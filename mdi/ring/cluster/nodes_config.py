"""The nodes file: the original MDI system's layout, read into frozen objects.

    {"nodes": {"starter": {...}, "intermediate": [{...}, ...], "finisher": {...}},
     "spares": [{...}, ...]}

Spares (optional, entries shaped like intermediate ones) are nodes that take
no part in the ring until one of its nodes fails: the starter then re-plans
over the nodes still alive plus the spares that answer (ring_engine.py).

Each node: "addr", "communication": {"port", "starter_addr"?},
"inference": {"port_in", "port_out"}, and optionally "device" and "layers"
(a count or a [start, stop] pair). Errors name the field, e.g.
`nodes.intermediate[1].inference.port_in`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


class NodesConfigError(ValueError):
    """A nodes file that cannot be used; the message names the field."""


@dataclass(frozen=True)
class NodeSpec:
    role: str                     # "starter" | "intermediate" | "finisher" | "spare"
    index: int                    # position among intermediates or spares (0 for the others)
    addr: str
    port: int                     # control plane (HTTP)
    port_in: int                  # data plane: where this node listens
    port_out: int                 # kept for compatibility with the original layout
    device: str = "cpu"
    layers: int | tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return f"{self.role}[{self.index}]" if self.role in ("intermediate", "spare") else self.role

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}"

    def describe(self) -> str:
        return f"{self.name} at {self.addr}:{self.port}"


@dataclass(frozen=True)
class NodesConfig:
    starter: NodeSpec
    intermediate: tuple[NodeSpec, ...]
    finisher: NodeSpec | None
    spares: tuple[NodeSpec, ...] = ()

    @property
    def ring(self) -> list[NodeSpec]:
        """All nodes in ring order: starter, intermediates, finisher."""
        tail = [self.finisher] if self.finisher else []
        return [self.starter, *self.intermediate, *tail]

    @property
    def secondaries(self) -> list[NodeSpec]:
        return self.ring[1:]

    def reformed(self, secondaries: list[NodeSpec], spares: list[NodeSpec] = ()) -> "NodesConfig":
        """The same starter with another ring behind it (after a failure): the last
        of `secondaries` finishes. Specs keep their names (a spare stays `spare[K]`);
        per-node layers are dropped: the new ring is planned anew."""
        starter = replace(self.starter, layers=None)
        ring = [replace(s, layers=None) for s in secondaries]
        if not ring:
            return NodesConfig(starter, (), None, tuple(spares))
        return NodesConfig(starter, tuple(ring[:-1]), ring[-1], tuple(spares))

    def leaving_out(self, names: set[str], keep: bool = False) -> "NodesConfig":
        """The ring without the nodes `names` (a plan gave them no layers): they
        join the spares when the run has spares or `keep` (a live re-plan: nodes that
        were in the ring; a recovery may take them back), else they stay idle.
        Unchanged when `names` is empty."""
        if not names:
            return self
        gone = [s for s in self.secondaries if s.name in names]
        kept = [s for s in self.secondaries if s.name not in names]
        spares = [*self.spares, *gone] if self.spares or keep else []
        return self.reformed(kept, spares)

    def find(self, role: str, index: int = 0) -> NodeSpec:
        if role == "starter":
            return self.starter
        if role == "finisher":
            if self.finisher is None:
                raise NodesConfigError("the nodes file has no finisher")
            return self.finisher
        if role == "intermediate":
            if not 0 <= index < len(self.intermediate):
                raise NodesConfigError(f"the nodes file has {len(self.intermediate)} intermediate "
                                       f"node(s); index {index} does not exist")
            return self.intermediate[index]
        if role == "spare":
            if not 0 <= index < len(self.spares):
                raise NodesConfigError(f"the nodes file lists {len(self.spares)} spare node(s); "
                                       f"index {index} does not exist")
            return self.spares[index]
        raise NodesConfigError(f"unknown role {role!r} (starter, intermediate, finisher or spare)")

    def to_dict(self) -> dict[str, Any]:
        def node(n: NodeSpec) -> dict[str, Any]:
            d: dict[str, Any] = {"addr": n.addr, "communication": {"port": n.port},
                                 "inference": {"port_in": n.port_in, "port_out": n.port_out},
                                 "device": n.device}
            if n.role != "starter":
                d["communication"]["starter_addr"] = self.starter.addr
            if n.layers is not None:
                d["layers"] = list(n.layers) if isinstance(n.layers, tuple) else n.layers
            return d
        nodes: dict[str, Any] = {"starter": node(self.starter),
                                 "intermediate": [node(n) for n in self.intermediate]}
        if self.finisher:
            nodes["finisher"] = node(self.finisher)
        out: dict[str, Any] = {"nodes": nodes}
        if self.spares:
            out["spares"] = [node(n) for n in self.spares]
        return out


def _port(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise NodesConfigError(f"{where} must be a port number 1-65535, got {value!r}")
    return value


def _node(d: Any, role: str, index: int, where: str) -> NodeSpec:
    if not isinstance(d, dict):
        raise NodesConfigError(f"{where} must be an object")
    addr = d.get("addr")
    if not isinstance(addr, str) or not addr:
        raise NodesConfigError(f"{where}.addr must be a host address string, got {addr!r}")
    comm = d.get("communication")
    if not isinstance(comm, dict):
        raise NodesConfigError(f"{where}.communication must be an object with a port")
    inf = d.get("inference")
    if not isinstance(inf, dict):
        raise NodesConfigError(f"{where}.inference must be an object with port_in and port_out")
    port = _port(comm.get("port"), f"{where}.communication.port")
    port_in = _port(inf.get("port_in"), f"{where}.inference.port_in")
    port_out = _port(inf.get("port_out", port_in), f"{where}.inference.port_out")
    device = d.get("device", "cpu")
    if not isinstance(device, str):
        raise NodesConfigError(f"{where}.device must be a string like 'cpu' or 'cuda:1'")
    layers = d.get("layers")
    if layers is not None:
        if isinstance(layers, list) and len(layers) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in layers):
            layers = (layers[0], layers[1])
        elif not (isinstance(layers, int) and not isinstance(layers, bool) and layers > 0):
            raise NodesConfigError(f"{where}.layers must be a positive count or a [start, stop] pair")
    return NodeSpec(role, index, addr, port, port_in, port_out, device, layers)


def parse_nodes_config(data: Any) -> NodesConfig:
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), dict):
        raise NodesConfigError("the nodes file must be an object with a 'nodes' object")
    nodes = data["nodes"]
    if "starter" not in nodes:
        raise NodesConfigError("nodes.starter is missing")
    starter = _node(nodes["starter"], "starter", 0, "nodes.starter")
    inter = nodes.get("intermediate", [])
    if inter is None:
        inter = []
    if not isinstance(inter, list):
        raise NodesConfigError("nodes.intermediate must be a list (it may be empty)")
    intermediate = tuple(_node(n, "intermediate", i, f"nodes.intermediate[{i}]")
                         for i, n in enumerate(inter))
    finisher = _node(nodes["finisher"], "finisher", 0, "nodes.finisher") if nodes.get("finisher") else None
    if intermediate and finisher is None:
        raise NodesConfigError("nodes.finisher is missing (intermediate nodes need a finisher)")
    spares = data.get("spares", [])
    if not isinstance(spares, list):
        raise NodesConfigError("spares must be a list of nodes shaped like intermediate ones")
    cfg = NodesConfig(starter, intermediate, finisher,
                      tuple(_node(n, "spare", i, f"spares[{i}]") for i, n in enumerate(spares)))
    for n in cfg.spares:
        if n.layers is not None:
            raise NodesConfigError(f"spares[{n.index}].layers: a spare's layers are planned when "
                                   f"it joins the ring")
    if cfg.spares and finisher is None:
        raise NodesConfigError("spares need a ring of two or more nodes (nodes.finisher is missing)")
    seen: dict[tuple[str, int], str] = {}
    for n in (*cfg.ring, *cfg.spares):
        for kind, p in (("communication.port", n.port), ("inference.port_in", n.port_in)):
            key = (n.addr, p)
            if key in seen:
                raise NodesConfigError(f"{n.name}.{kind} {n.addr}:{p} is already used by {seen[key]}")
            seen[key] = f"{n.name}.{kind}"
    return cfg


def load_nodes_config(path: str | Path) -> NodesConfig:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise NodesConfigError(f"nodes file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise NodesConfigError(f"cannot read nodes file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise NodesConfigError(f"{path} is not valid JSON: {e}") from None
    try:
        return parse_nodes_config(data)
    except NodesConfigError as e:
        raise NodesConfigError(f"{path}: {e}") from None


def local_nodes_config(n_nodes: int, ports: list[int], addrs: list[str] | None = None,
                       n_spares: int = 0) -> NodesConfig:
    """A config for n nodes and n_spares spares from two ports each (control, data;
    the nodes' first, then the spares'); loopback by default (addrs: the nodes')."""
    if n_nodes < 1 or n_spares < 0 or len(ports) < 2 * (n_nodes + n_spares):
        raise ValueError(f"need at least one node and two ports per node or spare, got {n_nodes} "
                         f"node(s), {n_spares} spare(s) and {ports}")
    if n_spares and n_nodes < 2:
        raise ValueError("spares need a ring of two or more nodes")
    addrs = addrs or ["127.0.0.1"] * n_nodes
    if len(addrs) != n_nodes:
        raise ValueError(f"need one address per node: {n_nodes} nodes, {len(addrs)} addresses")
    specs = []
    for i in range(n_nodes):
        role = "starter" if i == 0 else ("finisher" if i == n_nodes - 1 else "intermediate")
        specs.append(NodeSpec(role, max(0, i - 1) if role == "intermediate" else 0, addrs[i],
                              ports[2 * i], ports[2 * i + 1], ports[2 * i + 1]))
    spare_ports = ports[2 * n_nodes:]
    spares = tuple(NodeSpec("spare", k, addrs[0], spare_ports[2 * k], spare_ports[2 * k + 1],
                            spare_ports[2 * k + 1]) for k in range(n_spares))
    return NodesConfig(specs[0], tuple(specs[1:-1]) if n_nodes > 1 else (),
                       specs[-1] if n_nodes > 1 else None, spares)

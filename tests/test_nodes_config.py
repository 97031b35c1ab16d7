"""The nodes file: the original system's layout, optional fields, errors that name
the field, loading from disk, find(), to_dict() round trips, local configs."""
from __future__ import annotations

import copy
import json

import pytest

from mdi.ring.cluster.nodes_config import (NodesConfig, NodesConfigError, NodeSpec, load_nodes_config,
                                   local_nodes_config, parse_nodes_config)

# Verbatim from /work/shared/DESIGN.md ("Configuration file").
ORIGINAL = """\
{"nodes": {
  "starter":      {"addr": "127.0.0.1", "communication": {"port": 8088},
                   "inference": {"port_in": 5088, "port_out": 5089}},
  "intermediate": [{"addr": "127.0.0.1",
                    "communication": {"starter_addr": "127.0.0.1", "port": 8089},
                    "inference": {"port_in": 5090, "port_out": 5091}}],
  "finisher":     {"addr": "127.0.0.1",
                   "communication": {"starter_addr": "127.0.0.1", "port": 8090},
                   "inference": {"port_in": 5092, "port_out": 5093}}}}
"""


def node(addr: str = "10.0.0.1", port: int = 8000, port_in: int = 5000, **extra) -> dict:
    d = {"addr": addr, "communication": {"port": port, "starter_addr": "10.0.0.1"},
         "inference": {"port_in": port_in, "port_out": port_in + 1}}
    d.update(extra)
    return d


def layout(n_inter: int = 1, finisher: bool = True) -> dict:
    nodes: dict = {"starter": node(port=8000, port_in=5000)}
    nodes["intermediate"] = [node(port=8001 + i, port_in=5002 + 2 * i) for i in range(n_inter)]
    if finisher:
        nodes["finisher"] = node(port=8100, port_in=5100)
    return {"nodes": nodes}


def test_original_layout():
    cfg = parse_nodes_config(json.loads(ORIGINAL))
    ring = cfg.ring
    assert [n.role for n in ring] == ["starter", "intermediate", "finisher"]
    assert [n.name for n in ring] == ["starter", "intermediate[0]", "finisher"]
    assert [n.url for n in ring] == ["http://127.0.0.1:8088", "http://127.0.0.1:8089",
                                     "http://127.0.0.1:8090"]
    assert [(n.port, n.port_in, n.port_out) for n in ring] == [
        (8088, 5088, 5089), (8089, 5090, 5091), (8090, 5092, 5093)]
    assert all(n.addr == "127.0.0.1" and n.device == "cpu" and n.layers is None for n in ring)
    assert cfg.secondaries == ring[1:]
    assert cfg.starter.describe() == "starter at 127.0.0.1:8088"


def test_load_original_layout_from_file(tmp_path):
    path = tmp_path / "nodes.json"
    path.write_text(ORIGINAL)
    assert load_nodes_config(path) == parse_nodes_config(json.loads(ORIGINAL))
    assert load_nodes_config(str(path)).finisher.port == 8090


@pytest.mark.parametrize("inter", [[], None, "absent"])
def test_zero_intermediates(inter):
    data = layout(0)
    if inter == "absent":
        del data["nodes"]["intermediate"]
    else:
        data["nodes"]["intermediate"] = inter
    cfg = parse_nodes_config(data)
    assert cfg.intermediate == ()
    assert [n.name for n in cfg.ring] == ["starter", "finisher"]


def test_starter_only():
    cfg = parse_nodes_config({"nodes": {"starter": node()}})
    assert cfg.finisher is None and cfg.ring == [cfg.starter] and cfg.secondaries == []


def test_several_intermediates_keep_their_order():
    cfg = parse_nodes_config(layout(3))
    assert [n.name for n in cfg.ring] == ["starter", "intermediate[0]", "intermediate[1]",
                                          "intermediate[2]", "finisher"]
    assert [n.index for n in cfg.intermediate] == [0, 1, 2]
    assert [n.port for n in cfg.intermediate] == [8001, 8002, 8003]
    assert [n.port_in for n in cfg.intermediate] == [5002, 5004, 5006]


def test_optional_device_layers_and_port_out():
    data = layout(1)
    data["nodes"]["starter"].update(device="cuda:1", layers=2)
    data["nodes"]["intermediate"][0].update(layers=[2, 5])
    del data["nodes"]["finisher"]["inference"]["port_out"]  # defaults to port_in
    cfg = parse_nodes_config(data)
    assert (cfg.starter.device, cfg.starter.layers) == ("cuda:1", 2)
    assert cfg.intermediate[0].layers == (2, 5)
    assert cfg.intermediate[0].device == "cpu"
    assert cfg.finisher.layers is None
    assert cfg.finisher.port_out == cfg.finisher.port_in == 5100


def test_ipv6_url():
    cfg = parse_nodes_config({"nodes": {"starter": node(addr="::1")}})
    assert cfg.starter.url == "http://[::1]:8000"


def test_same_port_on_different_hosts_is_fine():
    data = layout(1)
    data["nodes"]["intermediate"][0] = node(addr="10.0.0.2", port=8000, port_in=5000)
    data["nodes"]["finisher"] = node(addr="10.0.0.3", port=8000, port_in=5000)
    assert len(parse_nodes_config(data).ring) == 3


# --- errors that name the field --------------------------------------------------------

def _set(path: str, value):
    """A mutation of layout(2) setting (or, with value DELETE, deleting) a dotted path."""
    def mutate(data: dict) -> None:
        keys = path.split(".")
        d = data
        for k in keys[:-1]:
            d = d[int(k)] if isinstance(d, list) else d[k]
        last = keys[-1]
        if value is DELETE:
            del d[last]
        elif isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value
    return mutate


DELETE = object()

ERRORS = [
    ("not an object", lambda d: d.clear(), "'nodes'"),
    ("nodes not an object", _set("nodes", []), "'nodes'"),
    ("missing starter", _set("nodes.starter", DELETE), "nodes.starter"),
    ("starter not an object", _set("nodes.starter", "127.0.0.1"), "nodes.starter"),
    ("addr missing", _set("nodes.starter.addr", DELETE), "nodes.starter.addr"),
    ("addr empty", _set("nodes.finisher.addr", ""), "nodes.finisher.addr"),
    ("addr not a string", _set("nodes.intermediate.1.addr", 10), r"nodes.intermediate\[1\].addr"),
    ("communication missing", _set("nodes.starter.communication", DELETE),
     "nodes.starter.communication"),
    ("inference missing", _set("nodes.finisher.inference", DELETE), "nodes.finisher.inference"),
    ("port missing", _set("nodes.starter.communication.port", DELETE),
     "nodes.starter.communication.port"),
    ("port 0", _set("nodes.finisher.communication.port", 0), "nodes.finisher.communication.port"),
    ("port 65536", _set("nodes.finisher.communication.port", 65536),
     "nodes.finisher.communication.port"),
    ("port negative", _set("nodes.starter.communication.port", -80),
     "nodes.starter.communication.port"),
    ("port string", _set("nodes.intermediate.0.communication.port", "8089"),
     r"nodes.intermediate\[0\].communication.port"),
    ("port float", _set("nodes.intermediate.0.communication.port", 8089.0),
     r"nodes.intermediate\[0\].communication.port"),
    ("port bool", _set("nodes.starter.communication.port", True), "nodes.starter.communication.port"),
    ("port_in missing", _set("nodes.intermediate.1.inference.port_in", DELETE),
     r"nodes.intermediate\[1\].inference.port_in"),
    ("port_in out of range", _set("nodes.finisher.inference.port_in", 70000),
     "nodes.finisher.inference.port_in"),
    ("port_out bad", _set("nodes.finisher.inference.port_out", "x"),
     "nodes.finisher.inference.port_out"),
    ("intermediate not a list", _set("nodes.intermediate", {"addr": "x"}), "nodes.intermediate"),
    ("intermediate entry not an object", _set("nodes.intermediate.1", 5),
     r"nodes.intermediate\[1\]"),
    ("intermediates without finisher", _set("nodes.finisher", DELETE), "nodes.finisher"),
    ("duplicate control ports", _set("nodes.finisher.communication.port", 8000),
     "finisher.communication.port 10.0.0.1:8000 is already used by starter.communication.port"),
    ("duplicate data ports", _set("nodes.intermediate.1.inference.port_in", 5002),
     r"intermediate\[1\].inference.port_in 10.0.0.1:5002 is already used by "
     r"intermediate\[0\].inference.port_in"),
    ("control port = data port", _set("nodes.starter.inference.port_in", 8001),
     r"intermediate\[0\].communication.port 10.0.0.1:8001 is already used by "
     r"starter.inference.port_in"),
    ("layers zero", _set("nodes.starter.layers", 0), "nodes.starter.layers"),
    ("layers negative", _set("nodes.starter.layers", -2), "nodes.starter.layers"),
    ("layers bool", _set("nodes.finisher.layers", True), "nodes.finisher.layers"),
    ("layers string", _set("nodes.finisher.layers", "2"), "nodes.finisher.layers"),
    ("layers float", _set("nodes.finisher.layers", 2.0), "nodes.finisher.layers"),
    ("layers triple", _set("nodes.intermediate.0.layers", [0, 1, 2]),
     r"nodes.intermediate\[0\].layers"),
    ("layers pair of strings", _set("nodes.intermediate.0.layers", ["0", "1"]),
     r"nodes.intermediate\[0\].layers"),
    ("layers pair with bool", _set("nodes.intermediate.0.layers", [0, True]),
     r"nodes.intermediate\[0\].layers"),
    ("layers object", _set("nodes.intermediate.0.layers", {"start": 0}),
     r"nodes.intermediate\[0\].layers"),
    ("device int", _set("nodes.finisher.device", 1), "nodes.finisher.device"),
    ("device list", _set("nodes.starter.device", ["cuda:0"]), "nodes.starter.device"),
]


@pytest.mark.parametrize("mutate,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_name_the_field(mutate, match):
    data = layout(2)
    parse_nodes_config(copy.deepcopy(data))  # the unmutated layout is valid
    mutate(data)
    with pytest.raises(NodesConfigError, match=match):
        parse_nodes_config(data)


@pytest.mark.parametrize("data", [None, [], "nodes", 3])
def test_not_a_mapping(data):
    with pytest.raises(NodesConfigError, match="'nodes'"):
        parse_nodes_config(data)


def test_load_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(NodesConfigError, match="not found") as e:
        load_nodes_config(path)
    assert str(path) in str(e.value)


def test_load_invalid_json_names_the_path(tmp_path):
    path = tmp_path / "nodes.json"
    path.write_text('{"nodes": {"starter": ')
    with pytest.raises(NodesConfigError, match="not valid JSON") as e:
        load_nodes_config(path)
    assert str(path) in str(e.value)


def test_load_bad_field_names_path_and_field(tmp_path):
    data = layout(1)
    data["nodes"]["finisher"]["inference"]["port_in"] = "5100"
    path = tmp_path / "nodes.json"
    path.write_text(json.dumps(data))
    with pytest.raises(NodesConfigError) as e:
        load_nodes_config(path)
    assert str(path) in str(e.value) and "nodes.finisher.inference.port_in" in str(e.value)


# --- find, to_dict ----------------------------------------------------------------------

def test_find_each_role():
    cfg = parse_nodes_config(layout(2))
    assert cfg.find("starter") is cfg.starter
    assert cfg.find("finisher") is cfg.finisher
    assert cfg.find("intermediate", 0) is cfg.intermediate[0]
    assert cfg.find("intermediate", 1) is cfg.intermediate[1]
    assert cfg.find("intermediate").name == "intermediate[0]"


@pytest.mark.parametrize("role,index,match", [
    ("intermediate", 2, "2 intermediate node.*index 2"),
    ("intermediate", -1, "index -1"),
    ("worker", 0, "unknown role 'worker'"),
])
def test_find_bad(role, index, match):
    cfg = parse_nodes_config(layout(2))
    with pytest.raises(NodesConfigError, match=match):
        cfg.find(role, index)


def test_find_missing_roles():
    cfg = parse_nodes_config({"nodes": {"starter": node()}})
    with pytest.raises(NodesConfigError, match="no finisher"):
        cfg.find("finisher")
    with pytest.raises(NodesConfigError, match="0 intermediate"):
        cfg.find("intermediate", 0)


@pytest.mark.parametrize("data", [
    json.loads(ORIGINAL),
    layout(0),
    layout(3),
    {"nodes": {"starter": node(device="cuda:0", layers=[0, 2])}},
])
def test_to_dict_round_trips(data):
    if "finisher" in data["nodes"] and data["nodes"]["intermediate"]:
        data["nodes"]["intermediate"][0]["layers"] = 3
        data["nodes"]["finisher"]["device"] = "cuda:1"
    cfg = parse_nodes_config(data)
    d = cfg.to_dict()
    json.dumps(d)  # serializable as is
    assert parse_nodes_config(d) == cfg
    assert parse_nodes_config(json.loads(json.dumps(d))) == cfg


# --- local configs ---------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_local_nodes_config(n):
    ports = list(range(9000, 9000 + 2 * n))
    cfg = local_nodes_config(n, ports)
    ring = cfg.ring
    assert len(ring) == n
    assert [x.port for x in ring] == ports[0::2]
    assert [x.port_in for x in ring] == ports[1::2]
    assert all(x.addr == "127.0.0.1" and x.port_out == x.port_in for x in ring)
    names = ["starter"] + [f"intermediate[{i}]" for i in range(max(0, n - 2))] + (
        ["finisher"] if n > 1 else [])
    assert [x.name for x in ring] == names
    assert (cfg.finisher is None) == (n == 1)
    # a local config is a valid nodes file
    assert parse_nodes_config(cfg.to_dict()) == cfg


def test_local_nodes_config_too_few_ports():
    with pytest.raises(ValueError, match="two ports per node"):
        local_nodes_config(3, [9000, 9001, 9002])


def test_local_nodes_config_per_node_addrs():
    cfg = local_nodes_config(3, [1, 2, 3, 4, 5, 6], addrs=["10.0.0.1", "10.0.0.2", "::1"])
    assert [n.url for n in cfg.ring] == ["http://10.0.0.1:1", "http://10.0.0.2:3", "http://[::1]:5"]
    assert parse_nodes_config(cfg.to_dict()) == cfg


def test_node_spec_is_frozen():
    spec = NodeSpec("starter", 0, "h", 1, 2, 3)
    with pytest.raises(AttributeError):
        spec.port = 5  # type: ignore[misc]
    assert isinstance(NodesConfig(spec, (), None).ring[0], NodeSpec)


# --- spares: nodes that join the ring when one of its nodes fails ---------------------------

def with_spares(n: int) -> dict:
    data = layout(1)
    data["spares"] = [node(port=8200 + k, port_in=5200 + 2 * k) for k in range(n)]
    return data


def test_spares_are_parsed_found_and_round_trip():
    cfg = parse_nodes_config(with_spares(2))
    assert [s.name for s in cfg.spares] == ["spare[0]", "spare[1]"]
    assert [s.port for s in cfg.spares] == [8200, 8201]
    assert cfg.find("spare", 1) is cfg.spares[1]
    assert all(s not in cfg.ring for s in cfg.spares)
    assert parse_nodes_config(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(NodesConfigError, match="2 spare node.*index 2"):
        cfg.find("spare", 2)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(spares={"addr": "x"}), "spares must be a list"),
    (lambda d: d["spares"][0].pop("addr"), r"spares\[0\]\.addr"),
    (lambda d: d["spares"][1].update(layers=2), r"spares\[1\]\.layers: a spare's layers are planned"),
    (lambda d: d["spares"][1]["communication"].update(port=8001),
     r"spare\[1\]\.communication\.port 10\.0\.0\.1:8001 is already used by intermediate\[0\]"),
    (lambda d: d["nodes"].pop("finisher") and d["nodes"].update(intermediate=[]),
     "spares need a ring of two or more nodes"),
])
def test_bad_spares_name_the_field(mutate, match):
    data = with_spares(2)
    mutate(data)
    with pytest.raises(NodesConfigError, match=match):
        parse_nodes_config(data)


def test_reformed_ring_keeps_names_and_drops_planned_layers():
    data = with_spares(1)
    data["nodes"]["starter"]["layers"] = 2
    data["nodes"]["intermediate"][0]["layers"] = 1
    data["nodes"]["finisher"]["layers"] = 1
    cfg = parse_nodes_config(data)
    new = cfg.reformed([cfg.intermediate[0], cfg.spares[0]])
    assert [n.name for n in new.ring] == ["starter", "intermediate[0]", "spare[0]"]
    assert new.finisher.name == "spare[0]" and new.spares == ()
    assert all(n.layers is None for n in new.ring)
    alone = cfg.reformed([], cfg.spares)
    assert [n.name for n in alone.ring] == ["starter"] and alone.spares == cfg.spares


def test_local_nodes_config_with_spares():
    cfg = local_nodes_config(3, list(range(9000, 9010)), n_spares=2)
    assert [s.name for s in cfg.spares] == ["spare[0]", "spare[1]"]
    assert [(s.port, s.port_in) for s in cfg.spares] == [(9006, 9007), (9008, 9009)]
    assert parse_nodes_config(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="two ports per node or spare"):
        local_nodes_config(3, list(range(9000, 9007)), n_spares=1)


@pytest.mark.parametrize("argv,match", [
    (["run", "--nodes", "1", "--spares", "1"], "--spares must be 0, or positive with --nodes 2"),
    (["run", "--nodes", "3", "--spares", "-1"], "--spares must be 0"),
])
def test_mdi_run_refuses_spares_without_a_ring(argv, match, capsys):
    from mdi.cli.main import main

    from pathlib import Path

    bundled = Path(__file__).resolve().parents[1] / "models" / "shakespeare-char"
    assert main([*argv, "--ckpt", str(bundled)]) == 2  # a bad option value, found before a start
    assert match in capsys.readouterr().err


def test_serve_refuses_spares_without_a_local_ring():
    from mdi.serve.backend import BackendOptions

    with pytest.raises(ValueError, match="--spares must be 0, or positive with --nodes 2"):
        BackendOptions(ckpt="x", nodes=1, spares=1)
    with pytest.raises(ValueError, match="a nodes file lists its own spares"):
        BackendOptions(ckpt="x", nodes_config="n.json", spares=1)
    assert BackendOptions(ckpt="x", nodes=3, spares=2).recover

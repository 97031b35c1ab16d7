"""Reading the pickled `meta.pkl` vocabularies of nanoGPT and the original MDI.

A pickle can run any code while it loads, so `meta.pkl` is read with an
unpickler that resolves no global at all: no class, no function, no module.
Only the objects the pickle opcodes build by themselves remain (dict, list,
tuple, str, int, float, bool, None, plus sets and bytes, which we reject after
loading). That is all a char vocabulary needs.
"""
from __future__ import annotations

import io
import pickle
import pickletools
from pathlib import Path
from typing import Any

from .format import CheckpointError

# A char vocabulary pickle is a few kilobytes; refuse to even read huge files.
MAX_META_BYTES = 64 * 1024 * 1024
ALLOWED_TYPES = (dict, list, tuple, str, int, float, bool, type(None))
# Opcodes that fetch or call an object. find_class already refuses the globals;
# the scan also closes the EXT* path, which CPython may serve from
# copyreg's extension cache without calling find_class.
CALLING_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "BUILD", "NEWOBJ",
                             "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"})


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*)."""

    def find_class(self, module: str, name: str) -> Any:
        raise CheckpointError(
            f"refusing to load {module}.{name}: this pickle may only hold dicts, lists, "
            "tuples, strings, numbers, booleans and None")

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError("refusing to load a persistent id: not a plain-data pickle")


def check_plain(obj: Any) -> None:
    """Raise CheckpointError unless obj is built only of ALLOWED_TYPES.

    Iterative with a visited set: a pickle can build cyclic or very deep
    containers, which must not blow the Python stack.
    """
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if type(item) not in ALLOWED_TYPES:  # exact types: no subclasses
            raise CheckpointError(
                f"pickle holds a {type(item).__name__}; only dict, list, tuple, str, int, "
                "float, bool and None are allowed")
        if isinstance(item, (dict, list, tuple)):
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            else:
                stack.extend(item)


def restricted_loads(data: bytes, where: str = "pickle") -> Any:
    """Unpickle plain data only; any other content raises CheckpointError."""
    try:
        for op, arg, _ in pickletools.genops(data):  # parses only, runs nothing
            if op.name in CALLING_OPCODES:
                detail = f" ({arg})" if isinstance(arg, str) else ""
                raise CheckpointError(
                    f"refusing opcode {op.name}{detail}: this pickle may only hold dicts, lists, "
                    "tuples, strings, numbers, booleans and None")
        obj = RestrictedUnpickler(io.BytesIO(data)).load()
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, MemoryError, RecursionError) as e:  # what a corrupt pickle raises
        raise CheckpointError(f"{where} is not a valid pickle: {type(e).__name__}: {e}") from None
    try:
        check_plain(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return obj


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def load_meta_pkl(path: str | Path) -> dict[str, Any]:
    """Read a nanoGPT / original-MDI char vocabulary: {"stoi", "itos", "vocab_size"?}.

    Returns the dict with itos (int -> str) and stoi (str -> int) checked for
    type and for agreeing with each other; vocab_size, when present, is an int.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"vocabulary file not found: {path}")
    size = path.stat().st_size
    if size > MAX_META_BYTES:
        raise CheckpointError(f"{path} is {size} bytes, too large for a meta.pkl vocabulary")
    meta = restricted_loads(path.read_bytes(), str(path))
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(meta).__name__}")
    itos, stoi = meta.get("itos"), meta.get("stoi")
    if not isinstance(itos, dict):
        if "encoder" in meta or "vocab" in meta:
            raise CheckpointError(f"{path} is not a char vocabulary (no 'itos'); only char-level "
                                  "meta.pkl files can be imported")
        raise CheckpointError(f"{path}: field 'itos' must be a dict of id -> character")
    for i, s in itos.items():
        if not _is_id(i) or not isinstance(s, str):
            raise CheckpointError(f"{path}: 'itos' must map int -> str, found {i!r}: {s!r}")
    if stoi is not None:
        if not isinstance(stoi, dict):
            raise CheckpointError(f"{path}: field 'stoi' must be a dict of character -> id")
        for s, i in stoi.items():
            if not isinstance(s, str) or not _is_id(i):
                raise CheckpointError(f"{path}: 'stoi' must map str -> int, found {s!r}: {i!r}")
            if itos.get(i) != s:
                raise CheckpointError(f"{path}: 'stoi' and 'itos' disagree on {s!r} (id {i})")
        if len(stoi) != len(itos):
            raise CheckpointError(f"{path}: 'stoi' has {len(stoi)} entries, 'itos' {len(itos)}")
    vocab_size = meta.get("vocab_size")
    if vocab_size is not None and not _is_id(vocab_size):
        raise CheckpointError(f"{path}: 'vocab_size' must be an int, got {vocab_size!r}")
    return meta

"""A safetensors file written one tensor at a time (`mdi convert --quantize`).

safetensors puts its header (every tensor's name, dtype, shape and offsets)
before the data, so a writer given the tensors one by one cannot know it until
the last has come. `TensorFileWriter` appends each tensor's bytes to a side file
as it arrives (the caller then drops the tensor), and at `finish` writes the
header followed by that side file's bytes, copied in blocks, into the final
file, which replaces any old one atomically. The peak memory of a conversion is
then one tensor (plus a copy block), whatever the model's size; the disk holds
the data twice until `finish` ends.

The file is what `safetensors.torch.save_file` writes (the header padded with
spaces to 8 bytes), so safetensors' own readers and st_io.py read it alike.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from .st_io import INT8_DTYPES

ST_NAMES = {v: k for k, v in INT8_DTYPES.items()}  # torch dtype -> safetensors' name
COPY_BLOCK = 16 << 20


class TensorFileWriter:
    """Tensors appended by `add`, the file made by `finish` (or nothing, on `abort`);
    a context manager that aborts when its block raises."""

    def __init__(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.data_path = self.path.with_name(self.path.name + ".data.tmp")
        self.metadata = metadata or {}
        self.header: dict[str, dict] = {}
        self.dtypes: dict[str, torch.dtype] = {}  # name -> dtype, in the order they came
        self.offset = 0
        self._data = open(self.data_path, "wb")

    def add(self, name: str, t: torch.Tensor) -> None:
        """Append tensor `name` (its bytes are written now: drop it afterwards)."""
        if name in self.header:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        if t.dtype not in ST_NAMES:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {t.dtype}, which this "
                             f"writer does not store ({', '.join(map(str, ST_NAMES))})")
        t = t.detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        if n:  # viewed as bytes: numpy has no bfloat16
            self._data.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.offset, self.offset + n]}
        self.dtypes[name] = t.dtype
        self.offset += n

    def finish(self) -> Path:
        """Write the file: header, then the data; the side file goes."""
        self._data.close()
        header = {"__metadata__": self.metadata, **self.header} if self.metadata else self.header
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "wb") as out, open(self.data_path, "rb") as data:
                out.write(struct.pack("<Q", len(raw)))
                out.write(raw)
                shutil.copyfileobj(data, out, COPY_BLOCK)
            tmp.replace(self.path)  # atomic: a crash never leaves half a file
        finally:
            for p in (tmp, self.data_path):
                p.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        """Leave no file behind (an old one at `path` stays as it was)."""
        self._data.close()
        self.data_path.unlink(missing_ok=True)

    def __enter__(self) -> TensorFileWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is not None:
            self.abort()
        elif not self._data.closed:
            self.finish()


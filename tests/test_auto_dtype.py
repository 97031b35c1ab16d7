"""--dtype auto: float32 without native bfloat16; with it, bfloat16 only where a
probe finds it faster at 1 and 16 rows; the probe kept per CPU; MDI_AUTO_DTYPE
fixes the answer; the choice reaches --json with the stage's kernels."""
import json

import pytest

from mdi.cli import auto_dtype
from mdi.cli.auto_dtype import native_bf16_flags, resolve
from mdi.model.dtypes import dtype_name
from mdi.model.kernels import GEMM_DTYPE


def test_native_flags_read_from_cpuinfo(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert native_bf16_flags(f) == []
    f.write_text("processor\t: 0\nflags\t\t: avx2 avx512_bf16 amx_bf16 amx_tile\n")
    assert native_bf16_flags(f) == ["amx_bf16", "avx512_bf16"]
    f.write_text("Features\t: fp asimd bf16 i8mm\n")  # Arm
    assert native_bf16_flags(f) == ["bf16"]
    assert native_bf16_flags(tmp_path / "missing") == []


def test_no_native_bf16_is_float32_without_a_probe(monkeypatch):
    monkeypatch.delenv("MDI_AUTO_DTYPE", raising=False)
    monkeypatch.setattr(auto_dtype, "native_bf16_flags", lambda: [])
    monkeypatch.setattr(auto_dtype, "probe_ms", lambda: pytest.fail("probed"))
    name, why = resolve("auto")
    assert name == "float32" and "no native bfloat16" in why


@pytest.mark.parametrize("ms, want", [
    ({1: (2.0, 1.0), 16: (6.0, 2.0)}, "bfloat16"),   # faster at both
    ({1: (2.0, 1.0), 16: (6.0, 18.0)}, "float32"),   # 3x slower at 16 rows (no AMX)
    ({1: (2.0, 1.95), 16: (6.0, 2.0)}, "float32"),   # not faster at 1 row
])
def test_native_bf16_is_chosen_by_the_probe_and_kept(tmp_path, monkeypatch, ms, want):
    monkeypatch.delenv("MDI_AUTO_DTYPE", raising=False)
    monkeypatch.setenv("MDI_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(auto_dtype, "native_bf16_flags", lambda: ["amx_bf16"])
    calls = []

    def probe():
        calls.append(1)
        return {f"{name}_{rows}": ms[rows][i] for rows in (1, 16)
                for i, name in enumerate(("fp32", "bf16"))}

    monkeypatch.setattr(auto_dtype, "probe_ms", probe)
    name, why = resolve("auto")
    assert name == want and "amx_bf16" in why and len(calls) == 1
    kept = json.loads((tmp_path / "auto_dtype.json").read_text())
    assert len(kept) == 1 and set(next(iter(kept.values()))) == {"fp32_1", "bf16_1", "fp32_16", "bf16_16"}
    assert resolve("auto")[0] == want and len(calls) == 1  # the second start does not probe


def test_the_probe_times_all_four_products():
    ms = auto_dtype.probe_ms(rounds=2)
    assert set(ms) == {"fp32_1", "bf16_1", "fp32_16", "bf16_16"} and all(v > 0 for v in ms.values())


def test_env_fixes_the_answer_and_names_pass_through(monkeypatch):
    monkeypatch.setenv("MDI_AUTO_DTYPE", "bfloat16")
    assert resolve("auto") == ("bfloat16", "auto, fixed by MDI_AUTO_DTYPE")
    assert resolve("float16") == ("float16", "--dtype")
    monkeypatch.setenv("MDI_AUTO_DTYPE", "fp8")
    with pytest.raises(ValueError, match="MDI_AUTO_DTYPE='fp8'"):
        resolve("auto")


def test_json_says_the_dtype_and_the_kernels(tiny_ckpt, capsys):
    from mdi.cli.main import main

    assert main(["sample", "--ckpt", str(tiny_ckpt), "--n-samples", "1", "--n-tokens", "3",
                 "--json", "--quantize", "int8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compute"]["dtype"] == "float32"
    assert out["compute"]["dtype_from"] == "auto, fixed by MDI_AUTO_DTYPE"
    kernels = out["compute"]["kernels"]
    gemm = dtype_name(GEMM_DTYPE)  # bfloat16 where the CPU has it natively, else float32
    assert kernels[f"int8 weight-only up to 16 rows, {gemm} GEMM above"] == 8  # 2 blocks x 4
    assert sum(kernels.values()) == 8 + 1 + 2  # the head; token and position embeddings

"""The fast float32 path on Linux: OpenBLAS preloaded, and our single-row forwarding library in front
of it, built on first use; MLX's products then come from there and stay exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.cpu.blas import GEMV_LIBRARY_PREFIX, openblas_path, preloads, symbol_provider

pytestmark = pytest.mark.skipif(openblas_path() is None, reason="needs Debian's OpenBLAS (make test installs it)")

# Every operand layout of products with one row or column, a few rows, and more, through MLX; and
# cblas_sgemm called directly with beta = 0 on an output full of NaN, which must not survive.
CHECK = r"""
import ctypes, json
import mlx.core as mx, numpy as np
from runtime.cpu.blas import symbol_provider

rng = np.random.default_rng(0)
errors = []
for m, n, k in [(1, 300, 70), (70, 1, 300), (1, 1, 5), (3, 4, 5), (1, 4096, 576), (2, 1, 9), (4, 300, 70),
                (8, 1000, 576), (6, 64, 100), (9, 50, 20), (3, 4099, 64), (3, 64, 37), (5, 70, 33), (6, 64, 3000),
                (13, 300, 576), (24, 100, 700), (25, 40, 30), (9, 301, 300), (17, 70, 1100), (100, 64, 512),
                (21, 130, 1536)]:
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    ma, mb, mat, mbt = mx.array(a), mx.array(b), mx.array(a.T.copy()).T, mx.array(b.T.copy()).T
    c = rng.standard_normal((m, n), dtype=np.float32)
    for got, want in [(ma @ mb, a @ b), (ma @ mbt, a @ b), (mat @ mb, a @ b), (mat @ mbt, a @ b),
                      (mx.addmm(mx.array(c), ma, mb, alpha=2.0, beta=0.5), 2 * a @ b + 0.5 * c)]:
        errors.append(float(np.abs(np.array(got) - want).max() / max(1.0, np.abs(want).max())))

sgemm = ctypes.CDLL(None).cblas_sgemm
f = ctypes.c_float
x, w = np.ones(8, np.float32), np.full((8, 16), 0.5, np.float32)
out = np.full(16, np.nan, np.float32)
ptr = lambda v: v.ctypes.data_as(ctypes.c_void_p)
sgemm(101, 111, 111, 1, 16, 8, f(1.0), ptr(x), 8, ptr(w), 16, f(0.0), ptr(out), 16)
sgemm(101, 111, 112, 0, 16, 8, f(1.0), ptr(x), 8, ptr(w), 8, f(0.0), ptr(out), 16)  # no rows: nothing to do
print(json.dumps({"provider": symbol_provider("cblas_sgemm"), "max_error": max(errors), "nan_output": out.tolist()}))
"""


def run_check(libraries: list[str], threads: str = "1") -> dict:
    env = {**os.environ, "LD_PRELOAD": " ".join(libraries), "PYTHONPATH": str(Path(__file__).parent.parent),
           "OPENBLAS_NUM_THREADS": threads}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# One thread and two (the library's helper threads): single rows and a few take its own kernel.
@pytest.mark.parametrize("threads", ["1", "2"])
def test_single_row_products_go_to_the_forwarding_library_and_stay_exact(tmp_path, threads):
    libraries = preloads(tmp_path / "native")
    assert Path(libraries[0]).name.startswith(GEMV_LIBRARY_PREFIX) and libraries[1] == openblas_path()

    result = run_check(libraries, threads)

    assert Path(result["provider"]).name.startswith(GEMV_LIBRARY_PREFIX)
    assert result["max_error"] < 1e-5
    assert result["nan_output"] == [4.0] * 16


def test_openblas_alone_gives_the_same_products(tmp_path):
    result = run_check([openblas_path()])
    assert Path(result["provider"]).name.startswith("libopenblas")
    assert result["max_error"] < 1e-5


def test_the_library_is_built_once_and_reused(tmp_path):
    first = Path(preloads(tmp_path)[0])
    built = first.stat().st_mtime_ns
    assert Path(preloads(tmp_path)[0]) == first and first.stat().st_mtime_ns == built
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial files left behind


def test_without_a_compiler_openblas_is_preloaded_alone(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert preloads(tmp_path / "native") == [openblas_path()]
    assert "no C compiler found" in caplog.text


def test_without_a_preload_mlx_keeps_its_own_blas():
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("this test process runs with OpenBLAS preloaded")
    import mlx.core  # noqa: F401  (loads MLX and its bundled BLAS, privately)

    assert symbol_provider("cblas_sgemm") is None

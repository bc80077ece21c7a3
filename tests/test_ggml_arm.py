"""The patched ggml cross-built for aarch64 and run under qemu-aarch64 (scripts/arm_qemu.sh), on
both NEON variants the CPU patch selects at compile time (`neon`: no dotprod, on an emulated
Cortex-A57; `dotprod`: sdot): the numpy reference (gguf_types.dequantize) against the ARM
to_float bit for bit, vec_dot with protected slots against the fp64 reference dot, and
llama.cpp's test-quantize-fns and test-backend-ops (CPU, our types)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quant2gguf import gguf_types as gt
from quant2gguf import quantizer as qz
from test_ggml_cpu import random_weight

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "arm_qemu.sh"
VARIANTS = ["neon", "dotprod"]
NEEDS = {"aarch64-linux-gnu-gcc": "no aarch64 cross compiler (apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)",
         "aarch64-linux-gnu-g++": "no aarch64 cross C++ compiler (apt-get install g++-aarch64-linux-gnu)",
         "qemu-aarch64": "no qemu-aarch64 (apt-get install qemu-user)",
         "cmake": "no cmake"}


def _script(*args, timeout=3000) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def arm():
    missing = [why for tool, why in NEEDS.items() if shutil.which(tool) is None]
    if missing:
        pytest.skip("; ".join(missing))
    r = _script("build")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return Path(r.stdout.strip().splitlines()[-1])


def run_check(variant: str, *args) -> None:
    r = _script("run", variant, "q3g-check", *args, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.parametrize("variant", VARIANTS)
def test_to_float_bit_exact_on_arm(arm, variant, tmp_path):
    for name, t in gt.TYPES.items():
        rng = np.random.default_rng(t.id)
        for n, nb in [(1, 1), (3, 5), (16, 8)]:
            qw = random_weight(t, n, nb, rng)  # fp16 extremes, random slots
            packed = gt.pack(qw, t)
            with np.errstate(over="ignore"):
                ref = gt.dequantize(packed, t)
                ref_torch = qw.dequantize().numpy()
            assert np.array_equal(ref.view(np.uint32), ref_torch.view(np.uint32))
            packed.tofile(tmp_path / "w")
            run_check(variant, "to_float", t.id, tmp_path / "w", tmp_path / "out")
            got = np.fromfile(tmp_path / "out", np.float32).reshape(ref.shape)
            diff = np.nonzero(got.view(np.uint32) != ref.view(np.uint32))
            blocks = sorted({(int(r), int(c) // t.group_size) for r, c in zip(*diff)})
            assert not blocks, f"{variant} {name}: {len(blocks)} blocks differ (row, block): {blocks[:10]}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_vec_dot_with_protected_slots_on_arm(arm, variant, tmp_path):
    """Rows of every type (P types: 0..2 used slots per group, outliers) against Q8_1 activations
    made by the ARM build itself; the reference is the fp64 dot of the dequantized row with the
    dequantized Q8_1 activations, as in test_ggml_cpu."""
    rows = 6
    for name, t in gt.TYPES.items():
        rng = np.random.default_rng(200 + t.id)
        gen = torch.Generator().manual_seed(t.id)
        for trial in range(4):
            k = t.group_size * int(rng.integers(1, 9))
            w = torch.randn(rows, k, generator=gen)
            prot = None
            if t.slots:
                prot = torch.zeros(rows, k, dtype=torch.bool)
                for r in range(rows):
                    for b in range(k // t.group_size):
                        cnt = int(rng.integers(0, t.slots + 1))
                        prot[r, b * t.group_size + torch.randperm(t.group_size, generator=gen)[:cnt]] = True
                w[prot] *= 20
            qw = qz.quantize(w, 3, t.group_size, protect=prot, slots=t.slots)
            if t.slots:
                assert (qw.pidx != gt.EMPTY).any()
            packed = gt.pack(qw, t)
            wq = gt.dequantize(packed, t).astype(np.float64)
            packed.tofile(tmp_path / "w")
            x = (rng.standard_normal(k) * (1 + trial)).astype(np.float32)
            x.tofile(tmp_path / "x")
            run_check(variant, "vec_dot", t.id, k, tmp_path / "w", tmp_path / "x", tmp_path / "out")
            raw = np.fromfile(tmp_path / "out", np.uint8)
            nq = k // 32 * 36
            blk = raw[:nq].reshape(-1, 36)  # block_q8_1: d fp16, s fp16, qs int8[32]
            res = raw[nq:].view(np.float32)
            assert res.size == rows
            a = (blk[:, 0:2].copy().view("<f2").astype(np.float32) * blk[:, 4:].view(np.int8)).reshape(-1)
            for r in range(rows):
                ref = float(wq[r] @ a.astype(np.float64))
                # only the fp16 rounding of Q8_1's s = d*sum(q) and fp32 sums separate the two
                tol = (1e-3 * float(qw.offsets[r].float().abs().max()) * float(np.abs(a).sum())
                       + 1e-4 * float(np.abs(wq[r] * a).sum()) + 1e-5)
                assert abs(res[r] - ref) <= tol, f"{variant} {name} k={k} row {r}: {res[r]} vs {ref} (tol {tol})"


def test_quantize_fns_and_backend_ops_on_arm(arm):
    r = _script("test")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    for v in VARIANTS:
        log = (arm / f"test-quantize-fns-{v}.log").read_text()
        assert "0 tests failed" in log, f"{v}: {log[-2000:]}"
        for t in gt.TYPES.values():
            lines = [ln for ln in log.splitlines() if ln.strip().startswith(t.name.lower() + " ")]
            assert len(lines) == 3 and all(" ok " in ln for ln in lines), f"{v} {t.name}: {lines}"
        ops = (arm / f"test-backend-ops-{v}.log").read_text()
        ok = [ln for ln in ops.splitlines() if "q3_g" in ln and "OK" in ln]
        bad = [ln for ln in ops.splitlines() if "q3_g" in ln and "FAIL" in ln]
        assert not bad and len(ok) >= 200, f"{v}: {len(ok)} OK, failing: {bad[:5]}"
        assert "1/1 backends passed" in ops, ops[-1500:]

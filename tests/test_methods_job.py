"""scripts/qwen15_methods_job.sh, the GPU session's one job, run here with stand-ins for python3, nvidia-smi, pgrep and
the llama.cpp tools (tests/data/mock_device): its shell is what a 30-minute device session cannot afford to debug.
Checks the order of stages on two GPUs and on one: every lane's checkpoint but the two KD inits in stock grids reaches
compare_gguf, the speed stage, the synthetic shapes and (BENCH_GSM set) the GSM bench run on GPU 0 after the lanes in
that order, the bench gets our two distilled stock-type files and compare_gguf's F16, importance matrix and stock
files under its own names."""
import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MOCK = ROOT / "tests" / "data" / "mock_device"
LANES = ["rtn-g128", "gptq-g128", "loaq-g128", "laq-g128", "kd-laq-g128", "laq-g64", "kd-laq-g64", "gptq-q3k",
         "kd-gptq-q3k", "gptq-q3km", "kd-gptq-q3km"]


def run_job(tmp_path: Path, ngpu: int, **extra_env: str) -> tuple[str, str, str]:
    home, bin_ = tmp_path / "home", tmp_path / "bin"
    for d in ("stage/data", "stage/tools", "logs"):
        (home / d).mkdir(parents=True)
    (home / "stage" / "qwen15.gguf").write_text("gguf")
    (home / "stage" / "tools" / "synth_gguf.py").write_text("")
    (home / "logs" / "llama-build.log").write_text("build ok")
    tools = home / "q2gcache" / "llama" / "build-x-cuda-native" / "bin"
    tools.mkdir(parents=True)
    for t in ("llama-quantize", "llama-bench", "llama-batched-bench", "llama-perplexity"):
        (tools / t).symlink_to(MOCK / "llama-tool")
    bin_.mkdir()
    for t in ("python3", "nvidia-smi", "pgrep"):
        (bin_ / t).symlink_to(MOCK / t)
    (tmp_path / "t0").write_text(str(int(time.time())))
    env = {"HOME": str(home), "PATH": f"{bin_}:/usr/bin:/bin", "MOCKLOG": str(tmp_path / "python.log"),
           "MOCKLLAMA": str(tmp_path / "llama.log"), "MOCK_T0": str(tmp_path / "t0"), "MOCK_NGPU": str(ngpu),
           "GSM_WAIT": "60", "DISK_PROBE": "0", "BENCH_GSM": "250", **extra_env}
    r = subprocess.run(["bash", "scripts/qwen15_methods_job.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout, (tmp_path / "python.log").read_text(), (tmp_path / "llama.log").read_text()


@pytest.mark.parametrize("ngpu", [2, 1])
def test_methods_job_stages(tmp_path, ngpu):
    job, py, llama = run_job(tmp_path, ngpu)
    assert "all done" in job and (tmp_path / "home" / "logs" / "job.done").exists()
    for name in LANES:
        assert f"{name} rc=0" in job, job
        measured = f"compare measured {name} GPU={ngpu - 1}" in py  # compare_gguf on the last GPU
        assert measured == (name not in ("gptq-q3k", "gptq-q3km")), name  # inits measured by the 14th run
    # lanes on GPU k mod NGPU: on two GPUs both are used
    assert {line.split("GPU=")[1] for line in py.splitlines() if "quantized" in line} == {str(g) for g in range(ngpu)}
    lines = job.splitlines()
    at = {key: next(i for i, line in enumerate(lines) if key in line)
          for key in ("quantize lanes done", "llama-bench rc=0", "GSM bench rc=0", "shapes made", "shapes benched")}
    assert at["quantize lanes done"] < at["llama-bench rc=0"] < at["shapes benched"] < at["GSM bench rc=0"]
    assert at["shapes made"] < at["shapes benched"]
    bench = next(line for line in py.splitlines() if " bench GPU=" in line)
    assert "GPU=0 files: kd-gptq-q3k.gguf kd-gptq-q3km.gguf" in bench  # waited for the conversions
    for f in ("qwen15-F16.gguf", "qwen15.imatrix-news+code-128x512.gguf", "qwen15-Q3_K_S-imat-news+code-128x512.gguf",
              "qwen15-Q3_K_M-imat-news+code-128x512.gguf"):
        assert f in bench  # compare_gguf's files under bench's names: none made twice
    # speeds: qwen15 and the shapes on GPU 0 (4B with its fused variants, and 8B)
    assert "llama-bench -ngl 99 -t 4 -p 512 -n 128 -r 3 -o json -m " in llama
    shapes = [line for line in llama.splitlines() if "llama-batched-bench" in line and "/shapes/" in line]
    assert {line.rsplit("GPU=", 1)[1] for line in shapes} == {"0"}
    assert any("4b-Q3_G128-fqkv.gguf" in line for line in shapes) and any("8b-Q3_G128.gguf" in line for line in shapes)
    # our files again without batch 1's float-activation mat-vec (GGML_Q3G_MMVQ_F32Y=0), under -f32y0 names; nothing
    # else runs with it off
    f32y0 = [line for line in llama.splitlines() if " F32Y=0 " in line and not line.startswith("llama-perplexity ")]
    assert all(".gguf" not in w or w.endswith("-f32y0.gguf") for line in f32y0 for w in line.split()), f32y0
    # and end to end: the RTN file's news KLD with and without it, against compare_gguf's F16 log-probs
    kld = [line for line in llama.splitlines() if line.startswith("llama-perplexity -m ") and "rtn-g128.gguf" in line]
    assert len(kld) == 2 and {ln.split(" F32Y=")[1].split()[0] for ln in kld} == {"0", "1"}, kld
    assert all("qwen15-f16-news.logits --kl-divergence" in ln and " -ub 1 " in ln for ln in kld), kld  # batch-1 mat-vecs
    for name in ("rtn-g128-f32y0.gguf", "rtn-g128-fqkv-f32y0.gguf", "4b-Q3_G128-f32y0.gguf",
                 "4b-Q3_G128-fqkv-f32y0.gguf", "8b-Q3_G128-f32y0.gguf"):
        assert any(line.startswith("llama-bench ") and name in line for line in f32y0), name
        assert any(line.startswith("llama-batched-bench ") and name in line for line in f32y0), name
    results = tmp_path / "home" / "results"
    assert (results / "bench-report.md").exists() and (results / "batched-bench-qwen15.jsonl").exists()


def test_speed_only_job(tmp_path):
    """SPEED_ONLY=1: only the RTN lane (and its fused-q/k/v twin), compare_gguf with the three stock files the speed
    stage times, then the speeds (without the F32Y path too) and the shapes: no method lane, no GSM bench."""
    job, py, llama = run_job(tmp_path, 2, SPEED_ONLY="1", BENCH_GSM="0")
    assert "all done" in job and "rtn-g128 rc=0" in job and "convert --fuse-qkv rc=0" in job, job
    assert not [n for n in LANES if n != "rtn-g128" and f"{n} rc=" in job], job
    cmp = next(line for line in py.splitlines() if "compare_gguf.py" in line)
    assert "--types IQ3_S+imat Q3_K_S+imat Q3_K_M+imat --ckpts" in cmp and cmp.count("/bench/") == 1, cmp
    assert "llama-bench rc=0" in job and "shapes benched" in job and "GSM bench skipped" in job, job
    lines = job.splitlines()
    first = {k: next(i for i, ln in enumerate(lines) if k in ln) for k in ("compare rc=", "llama-bench rc=")}
    assert first["compare rc="] < first["llama-bench rc="], job  # speeds wait for compare's F16 and stock files
    assert any(" F32Y=0 " in line and "rtn-g128-f32y0.gguf" in line for line in llama.splitlines())

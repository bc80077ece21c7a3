"""The patch series and the build cache: clean application to a fresh pinned tree, cache keys."""
import shutil

import pytest

from quant2gguf import llama


def test_pin_and_series_present():
    pin = llama.pin()
    assert pin["package"] == "llama-cpp-python" and pin["version"] and len(pin["sha256"]) == 64
    names = [p.name for p in llama.patches()]
    assert names and names == sorted(names) and all(n[:4].isdigit() for n in names)


def test_series_applies_cleanly_to_fresh_pinned_tree(tmp_path):
    tree = llama.extract_source(tmp_path / "llama.cpp")
    assert not (tree / ".git").exists()  # the sdist's submodule link is dropped
    llama.apply_patches(tree, check=True)
    llama.apply_patches(tree)
    assert "GGML_TYPE_Q3_G128" in (tree / "ggml/include/ggml.h").read_text()
    assert (tree / "ggml/src/ggml-q3g.c").is_file() and (tree / "ggml/src/ggml-cpu/q3g.c").is_file()
    assert "Q3_G64P  = 99" in (tree / "gguf-py/gguf/constants.py").read_text()
    with pytest.raises(RuntimeError, match="does not apply"):  # applying twice must fail loudly
        llama.apply_patches(tree, check=True)


def test_cuda_q3g_kernels_on_the_host(tmp_path):
    """The CUDA patch's block dots (q3g.cuh: vec_dot and the batch 2..8 wrow kernel's) against an fp64
    dot of the dequantized rows, and a CPU emulation of mul_mat_vec_q3g_wrow cut out of the patched
    mmvq.cu (a thread per CUDA thread: strides, broadcast, row tails, used slots), with no GPU or nvcc."""
    import os
    import subprocess
    if not shutil.which("g++"):
        pytest.skip("g++ is missing")
    tree = llama.extract_source(tmp_path / "llama.cpp")
    llama.apply_patches(tree)
    script = llama.patch_dir().parent / "scripts" / "cuda_patch_compile_check.sh"
    r = subprocess.run(["bash", str(script), str(tree)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "SKIP_NVCC": "1", "OUT_DIR": str(tmp_path / "out")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "OK   q3g-host-check" in r.stdout and "OK   q3g-wrow-emu" in r.stdout, r.stdout[-3000:]


def test_mmvq_microbenchmark_selftest_on_the_host(tmp_path):
    """The CUDA mat-vec microbenchmark (scripts/cuda_q3g_mmvq_bench.cu, run on the GPU machine) built as plain C++:
    its reference dot against a plain dequantized dot, and the batch-1 q4 variants' addressing (every quad and every
    repacked 16-byte chunk visited exactly once, every shape, 32..256 threads a CTA). The kernels' outputs are
    host-checked on the GPU itself; the nvcc build's --q4-host-emu also runs their math on a CPU (no nvcc here)."""
    import subprocess
    if not shutil.which("g++"):
        pytest.skip("g++ is missing")
    src = llama.patch_dir().parent / "scripts" / "cuda_q3g_mmvq_bench.cu"
    exe = tmp_path / "mmvq"
    subprocess.run(["g++", "-O2", "-std=c++17", "-x", "c++", str(src), "-o", str(exe)], check=True, timeout=300)
    r = subprocess.run([str(exe), "--cpu-selftest"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "cpu selftest PASS" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert "q4 index mimic (6 shapes x NT 32..256): 0 errors" in r.stdout, r.stdout[-2000:]


def test_patch_hash_changes_with_any_patch(tmp_path, monkeypatch):
    d = tmp_path / "patches"
    shutil.copytree(llama.patch_dir(), d)
    h0 = llama.patch_hash(d)
    assert h0 == llama.patch_hash(d) == llama.patch_hash()
    first = llama.patches(d)[0]
    first.write_bytes(first.read_bytes() + b"\n")
    h1 = llama.patch_hash(d)
    assert h1 != h0
    first.rename(first.with_name("9999-" + first.name[5:]))  # order is part of the key
    h2 = llama.patch_hash(d)
    assert h2 not in (h0, h1)
    (d / "README.md").write_text("docs do not count")
    assert llama.patch_hash(d) == h2
    # and the build cache follows: a changed series never reuses the old build
    monkeypatch.setattr(llama, "patch_dir", lambda: d)
    assert llama._build_dir(False).name == f"build-{llama.pin()['version']}-{h2}" != f"build-{llama.pin()['version']}-{h0}"


def test_cache_dirs_follow_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANT2GGUF_CACHE", str(tmp_path))
    key = llama.cache_key()
    assert key == f"{llama.pin()['version']}-{llama.patch_hash()}"
    assert llama._build_dir(False).name == f"build-{key}"  # the CPU key CI's cached build uses
    assert llama._build_dir(True).name == f"build-{key}-cuda-native"
    assert llama._build_dir(True, "89,90a").name == f"build-{key}-cuda-89_90a"
    with pytest.raises(ValueError, match="--cuda-arch"):
        llama._build_dir(True, "../90")
    with pytest.raises(RuntimeError, match="quant2gguf llama build"):
        llama.bin_dir()
    with pytest.raises(RuntimeError, match="quant2gguf llama build --cuda --cuda-arch native"):
        llama.tool("llama-completion", cuda=True)


def test_cuda_arch_reaches_cmake_and_the_key(tmp_path, monkeypatch):
    """`--cuda-arch` goes to CMAKE_CUDA_ARCHITECTURES and keys the build; other archs stay unbuilt."""
    monkeypatch.setenv("QUANT2GGUF_CACHE", str(tmp_path))
    monkeypatch.setattr(llama, "source_dir", lambda: tmp_path / "src")
    monkeypatch.setattr(llama.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "nvcc" else None)
    cmds = []
    monkeypatch.setattr(llama, "_run_logged", lambda cmd, log, status: cmds.append(cmd))
    from typer.testing import CliRunner

    from quant2gguf.cli import app
    r = CliRunner().invoke(app, ["llama", "build", "--cuda", "--cuda-arch", "89,90"])
    assert r.exit_code == 0, r.output
    assert "-DCMAKE_CUDA_ARCHITECTURES=89;90" in cmds[0] and "-DGGML_CUDA=ON" in cmds[0]
    assert llama.bin_dir(cuda=True, cuda_arch="89,90").parent.name.endswith("-cuda-89_90")
    with pytest.raises(RuntimeError, match="--cuda-arch 90"):
        llama.bin_dir(cuda=True, cuda_arch="90")
    r = CliRunner().invoke(app, ["llama", "build", "--cuda-arch", "89"])
    assert r.exit_code == 1 and "add --cuda" in r.output


def test_failed_command_names_command_and_log(tmp_path):
    log = tmp_path / "build.log"
    with pytest.raises(RuntimeError) as e:
        llama._run_logged(["sh", "-c", "echo compiling; exit 3"], log, None)
    assert "sh -c" in str(e.value) and str(log) in str(e.value) and "exit 3" in str(e.value)
    assert "compiling" in log.read_text()


def test_cpu_tools_fall_back_to_the_cuda_build(monkeypatch, tmp_path):
    """On a GPU machine only the CUDA build exists; llama-quantize (convert's dry run) runs from it."""
    from quant2gguf import llama, runner
    built = {True: tmp_path / "cuda" / "llama-quantize"}

    def tool(name, cuda=False):
        if cuda not in built:
            raise RuntimeError(f"llama.cpp is not built; run `quant2gguf llama build{' --cuda' if cuda else ''}`")
        return built[cuda]
    monkeypatch.setattr(llama, "tool", tool)
    assert runner._tool("llama-quantize") == built[True]
    built.clear()
    with pytest.raises(RuntimeError, match=r"build`$"):  # the CPU build's message, not the CUDA one's
        runner._tool("llama-quantize")
    with pytest.raises(RuntimeError, match="--cuda"):
        runner._tool("llama-quantize", cuda=True)

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


def test_patch_hash_changes_with_any_patch(tmp_path):
    d = tmp_path / "patches"
    shutil.copytree(llama.patch_dir(), d)
    h0 = llama.patch_hash(d)
    assert h0 == llama.patch_hash(d) == llama.patch_hash()
    first = llama.patches(d)[0]
    first.write_bytes(first.read_bytes() + b"\n")
    h1 = llama.patch_hash(d)
    assert h1 != h0
    first.rename(first.with_name("9999-" + first.name[5:]))  # order is part of the key
    assert llama.patch_hash(d) not in (h0, h1)
    (d / "README.md").write_text("docs do not count")
    assert llama.patch_hash(d) == llama.patch_hash(d)


def test_cache_dirs_follow_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANT2GGUF_CACHE", str(tmp_path))
    key = llama.cache_key()
    assert key == f"{llama.pin()['version']}-{llama.patch_hash()}"
    assert llama._build_dir(False).name == f"build-{key}"
    assert llama._build_dir(True).name == f"build-{key}-cuda"
    with pytest.raises(RuntimeError, match="quant2gguf llama build"):
        llama.bin_dir()
    with pytest.raises(RuntimeError, match="quant2gguf llama build --cuda"):
        llama.tool("llama-completion", cuda=True)


def test_failed_command_names_command_and_log(tmp_path):
    log = tmp_path / "build.log"
    with pytest.raises(RuntimeError) as e:
        llama._run_logged(["sh", "-c", "echo compiling; exit 3"], log, None)
    assert "sh -c" in str(e.value) and str(log) in str(e.value) and "exit 3" in str(e.value)
    assert "compiling" in log.read_text()

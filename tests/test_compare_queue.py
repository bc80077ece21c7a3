"""scripts/compare_gguf.py's work queue: a complete checkpoint before any stock file still to do (the eleventh
qwen15 run measured no checkpoint because six stock files held the slots), checkpoints that never appear skipped at
the deadline, a failed row raised; each worker on its own CPU share, conversions in processes of their own (the
thirteenth run's in-process conversions on all cores took ~580 s each)."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from compare_gguf import Pinner, convert_process, cpu_slots, run_queue  # noqa: E402


def _recorder(ready_after: dict[str, str] | None = None):
    """Rows append their names in order; a checkpoint in ready_after becomes ready once that row is done."""
    order, done, lock = [], set(), threading.Lock()
    ready_after = ready_after or {}

    def row(name):
        with lock:
            order.append(name)
            done.add(name)

    def ready(ck):
        return ck not in ready_after or ready_after[ck] in done

    return order, row, ready


def test_checkpoints_go_before_stock_files():
    order, row, ready = _recorder({"ck-late": "IQ3_S"})
    run_queue(1, ["ck-early", "ck-late"], ["IQ3_S", "Q3_K_S", "Q3_K_M"], ready, row, row, wait=5, poll=0.01)
    # ck-early is ready at once; ck-late once IQ3_S is done, and then it jumps the two stock files still queued
    assert order == ["ck-early", "IQ3_S", "ck-late", "Q3_K_S", "Q3_K_M"]


def test_missing_checkpoint_is_skipped_at_the_deadline():
    order, row, ready = _recorder({"never": "no such row"})
    t0 = time.time()
    run_queue(2, ["ck", "never"], ["IQ3_S"], ready, row, row, wait=0.3, poll=0.02)
    assert sorted(order) == ["IQ3_S", "ck"]
    assert 0.3 <= time.time() - t0 < 5


def test_a_failed_row_is_raised():
    def bad(name):
        raise RuntimeError(f"llama-perplexity failed on {name}")

    with pytest.raises(RuntimeError, match="failed on ck"):
        run_queue(2, ["ck"], [], lambda c: True, bad, bad, wait=1, poll=0.01)


def test_conversions_run_beside_measuring():
    """With `prepare`, a checkpoint is converted by its own workers as soon as it is complete and measured only once
    converted; the measuring slot fills with stock files meanwhile instead of waiting on a conversion."""
    order, row, ready = _recorder()
    events, lock, gate = [], threading.Lock(), threading.Event()

    def prepare(ck):
        with lock:
            events.append(f"convert {ck}")
        assert gate.wait(5)  # the conversion lasts until a stock row has been measured

    def stock(t):
        row(t)
        gate.set()

    def ckpt(ck):
        with lock:
            assert f"convert {ck}" in events  # never measured before its conversion
        row(ck)

    run_queue(1, ["ck"], ["IQ3_S", "Q3_K_S"], ready, ckpt, stock, wait=5, poll=0.01, prepare=prepare, prepare_jobs=1)
    assert order[0] == "IQ3_S" and sorted(order) == ["IQ3_S", "Q3_K_S", "ck"]
    assert events == ["convert ck"]


def test_stock_files_are_made_by_the_preparing_workers():
    """With `prepare_stock`, the preparing workers make the stock files while no checkpoint is complete, a stock
    type is measured only once made, a complete checkpoint is converted before the stock files still to make, and
    the measuring worker only measures."""
    order, row, ready = _recorder({"ck": "make IQ3_S"})
    lock, events = threading.Lock(), []
    threads = {}

    def log(what):
        with lock:
            events.append(what)
            threads.setdefault(what.split()[0], set()).add(threading.current_thread().name)
        row(what)  # a checkpoint waiting on "make IQ3_S" becomes complete once it is

    def measure(name):
        with lock:
            assert f"convert {name}" in events or f"make {name}" in events, name  # never before it is prepared
        log(f"measure {name}")

    run_queue(1, ["ck"], ["IQ3_S", "Q3_K_S", "Q3_K_M"], ready, measure, measure, wait=5, poll=0.01,
              prepare=lambda ck: log(f"convert {ck}"), prepare_jobs=1, prepare_stock=lambda t: log(f"make {t}"))
    prep = [e for e in events if not e.startswith("measure")]
    assert prep == ["make IQ3_S", "convert ck", "make Q3_K_S", "make Q3_K_M"]  # the checkpoint jumps the queue
    assert sorted(e for e in events if e.startswith("measure")) == \
        ["measure IQ3_S", "measure Q3_K_M", "measure Q3_K_S", "measure ck"]
    assert not threads["measure"] & (threads["make"] | threads["convert"])


def test_a_failed_conversion_is_raised():
    def bad(ck):
        raise ValueError(f"{ck}: no such checkpoint")

    with pytest.raises(ValueError, match="ck: no such"):
        run_queue(1, ["ck"], [], lambda c: True, lambda c: None, lambda t: None, wait=1, poll=0.01,
                  prepare=bad, prepare_jobs=2)


def test_cpu_slots_are_disjoint_and_cover_the_cpus():
    slots = cpu_slots(3, list(range(32)))
    assert [len(x) for x in slots] == [11, 11, 10]
    assert sorted(c for x in slots for c in x) == list(range(32))
    assert cpu_slots(8, [4, 5, 6, 7]) == [[4], [5], [6], [7], [4], [5], [6], [7]]  # more workers than CPUs: shared
    assert cpu_slots(1, [9, 3]) == [[3, 9]]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to give two workers different ones")
def test_a_pinned_worker_and_the_programs_it_starts_keep_to_its_cpus():
    cpus = sorted(os.sched_getaffinity(0))
    pin, seen, lock = Pinner(cpu_slots(2, cpus)), {}, threading.Lock()

    def work(i):
        n = pin.threads()
        pin.threads()  # a second call keeps the thread's set
        child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                               capture_output=True, text=True, check=True).stdout
        with lock:
            seen[i] = (n, sorted(os.sched_getaffinity(0)), eval(child))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    sets = sorted(v[1] for v in seen.values())
    assert sets == sorted(cpu_slots(2, cpus))  # one share each, disjoint
    assert all(n == len(own) and child == own for n, own, child in seen.values())  # the child inherits the thread's
    assert sorted(os.sched_getaffinity(0)) == cpus  # the main thread is untouched


def test_convert_process_writes_what_convert_writes(tmp_path):
    from test_export import PRE, make_checkpoint

    from quant2gguf import export
    ck = make_checkpoint("qwen2", tmp_path, 64)
    want = export.convert(ck, tmp_path / "in-process.gguf", tokenizer_pre=PRE, fuse_qkv=False)  # as compare_gguf asks
    info = convert_process(ck, tmp_path / "process.gguf", "keep", 1, PRE, log=tmp_path / "convert.log")
    assert (tmp_path / "process.gguf").read_bytes() == (tmp_path / "in-process.gguf").read_bytes()
    assert info["tensors"] == want["tensors"] and info["n_quantized"] == want["n_quantized"] > 0
    with pytest.raises(RuntimeError, match="convert .* failed"):  # an existing output: the command refuses
        convert_process(ck, tmp_path / "process.gguf", "keep", 1, PRE)


def test_compare_gguf_end_to_end(tmp_path):
    """The whole script on a tiny model with the real llama.cpp tools: F16 first, then a checkpoint converted in a
    process of its own and stock files made by the preparing workers, measured by two workers; every row has its
    KLD against F16, the tool's own time and run count."""
    import json

    from test_export import PRE, make_checkpoint
    ck = make_checkpoint("qwen2", tmp_path, 64)
    out = tmp_path / "cmp" / "rows.json"
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "compare_gguf.py"),
                        "--model", str(tmp_path / "hf"), "--ckpts", str(ck), "--types", "Q4_0", "Q8_0",
                        "--texts", "news", "--workdir", str(tmp_path / "cmp"), "--out", str(out), "--embd-type", "keep",
                        "--jobs", "2", "--convert-jobs", "1", "--tokenizer-pre", PRE, "--wait", "60"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row["file"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"F16", "Q4_0", "Q8_0", "ours ckpt: rtn W3G64"}, set(rows)
    assert rows["F16"]["news"]["kld"] is None and rows["F16"]["news"]["ppl"] > 1
    for name in ("Q4_0", "Q8_0", "ours ckpt: rtn W3G64"):
        news = rows[name]["news"]
        assert news["kld"] >= 0 and news["tries"] >= 1 and 0 < news["tool_s"] <= news["seconds"] + 0.5, (name, news)
    assert rows["Q8_0"]["news"]["kld"] < rows["Q4_0"]["news"]["kld"] < rows["ours ckpt: rtn W3G64"]["news"]["kld"]
    log = r.stdout + r.stderr
    assert "made Q4_0" in log and "made Q8_0" in log and "converted ckpt" in log

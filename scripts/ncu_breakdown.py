"""Where a decode token's GPU time goes, per kernel category, from Nsight Compute CSV dumps of a llama.cpp decode
(scripts/device_shapes.sh writes them: `ncu --metrics gpu__time_duration.sum --cache-control none --clock-control
none --launch-skip 900 --launch-count 700 --csv llama-bench -m FILE -p 0 -n 6 -r 1 -ngl 99`, ~one token).

usage: python scripts/ncu_breakdown.py NCU.csv [...] --layers 36 --card "NVIDIA H200" --md OUT.md --png OUT.png
       [--csv-out OUT.csv] [--note TEXT]
The repeating layer period is found in the kernel sequence (smallest p with key[i] == key[i+p] for most i, key =
kernel short name and grid); the launches are aligned to it, and each position's median over the layers seen × --layers
gives the layers' time a token. Launches the alignment leaves out are the once-a-token work (final norm, output
mat-vec, the last layer's get_rows and residual add), counted once (one boundary where the window holds two).
ncu serializes kernels: every time is the kernel's own isolated duration, not overlapped CUDA-graph time, and launch
gaps are not in it.
--csv-out keeps the per-layer medians (file,pos,kernel,template,grid,block,median_ns) so the raw dumps need not be kept.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

CATEGORIES = ("mat-vec", "quantize activations", "norm", "attention", "rope/kv", "other")
RESYNC = 4  # launches that must match the period again after a mismatch


def split_name(full: str) -> tuple[str, str]:
    """'void f<A, B<C>>(args)' -> ('f', 'A, B<C>'); a name without template args -> (name, '')."""
    s = full.removeprefix("void ").strip()
    cut = min((i for i in (s.find("<"), s.find("(")) if i >= 0), default=len(s))
    if s[cut:cut + 1] != "<":
        return s[:cut], ""
    depth = 0
    for i in range(cut, len(s)):  # to the matching '>'
        depth += (s[i] == "<") - (s[i] == ">")
        if depth == 0:
            return s[:cut], s[cut + 1:i]
    return s[:cut], s[cut + 1:]


def parse(text: str) -> list[dict]:
    """ncu --csv output -> launches in order: {name, template, grid, block, ns}; lines before the CSV are skipped."""
    rows = csv.DictReader(line for line in text.splitlines() if line.startswith('"'))
    out = []
    for r in rows:
        if r["Metric Name"] != "gpu__time_duration.sum":
            continue
        name, tmpl = split_name(r["Kernel Name"])
        out.append({"name": name, "template": tmpl, "grid": r["Grid Size"], "block": r["Block Size"],
                    "ns": float(r["Metric Value"].replace(",", ""))})
    return out


def category(name: str) -> str:
    if name.startswith("mul_mat_vec"):
        return "mat-vec"
    if name.startswith("quantize_q8_1"):
        return "quantize activations"
    if name.startswith("rms_norm"):
        return "norm"
    if name.startswith("flash_attn"):
        return "attention"
    if name.startswith("rope") or "set_rows" in name:
        return "rope/kv"
    return "other"


def find_period(keys: list, min_agree: float = 0.8) -> tuple[int, int]:
    """(p, s): the smallest p with keys[i] == keys[i + p] for at least min_agree of i, and the first s whose next two
    periods repeat exactly (a clean layer to take the period's kernels from)."""
    n = len(keys)
    for p in range(1, n // 3 + 1):
        if sum(keys[i] == keys[i + p] for i in range(n - p)) >= min_agree * (n - p):
            s = next((s for s in range(n - 2 * p + 1) if keys[s:s + p] == keys[s + p:s + 2 * p]), None)
            if s is not None:
                return p, s
    raise ValueError("no repeating layer period in the kernel sequence")


def layer_start(names: list[str]) -> int:
    """Rotation that starts the period at the attention norm: the last norm before the first rope; without a rope
    the first norm; without either, as found."""
    rope = next((i for i, n in enumerate(names) if n.startswith("rope")), None)
    norms = [i for i, n in enumerate(names) if category(n) == "norm"]
    if not norms:
        return 0
    if rope is None:
        return norms[0]
    before = [i for i in norms if i < rope]
    return before[-1] if before else norms[-1]


def align(keys: list, period: list) -> list[int | None]:
    """Each launch's position in the period, None for a launch outside it. Walks the launches along the repeated
    period; on a mismatch it skips the fewest launches (insertions) plus period positions (a missing kernel) after
    which RESYNC launches match again."""
    p, n = len(period), len(keys)

    def matches(i: int, j: int) -> bool:
        k = min(RESYNC, n - i)
        return k > 0 and all(keys[i + t] == period[(j + t) % p] for t in range(k))

    out: list[int | None] = []
    # the window starts anywhere in a layer: the first position from which RESYNC launches match (else 0)
    i, j = 0, next((j for j in range(p) if matches(0, j)), 0)
    while i < n:
        if keys[i] == period[j % p]:
            out.append(j % p)
            i, j = i + 1, j + 1
            continue
        skips = sorted(((da, dt) for da in range(p + 1) for dt in range(p) if da + dt and matches(i + da, j + dt)),
                       key=lambda d: (sum(d), d[0]))
        da, dt = skips[0] if skips else (1, 0)
        out.extend([None] * min(da, n - i))
        i, j = i + da, j + dt
    return out


def roles(names: list[str]) -> list[str]:
    """Guess what each mat-vec of a layer (starting at the attention norm) multiplies, from its place: before the
    attention Q/K/V (or fused QKV), then O, after the second norm gate/up (fused) and down."""
    attn = next((i for i, n in enumerate(names) if category(n) == "attention"), None)
    norms = [i for i, n in enumerate(names) if category(n) == "norm"]
    out = [""] * len(names)
    if attn is None or len(norms) != 2:
        return out
    mv = [i for i, n in enumerate(names) if category(n) == "mat-vec"]
    groups = ([i for i in mv if i < attn], [i for i in mv if attn < i < norms[1]], [i for i in mv if i > norms[1]])
    labels = ({1: ["QKV"], 2: ["Q", "KV"], 3: ["Q", "K", "V"]}, {1: ["O"]},
              {1: ["FFN"], 2: ["gate+up", "down"], 3: ["gate", "up", "down"]})
    for g, lab in zip(groups, labels):
        for i, r in zip(g, lab.get(len(g), [])):
            out[i] = r
    return out


def breakdown(launches: list[dict], n_layers: int) -> dict:
    """Per-layer medians and per-token category times (µs) of one file's launches."""
    keys = [(k["name"], k["grid"]) for k in launches]
    p, s = find_period(keys)
    r = s + layer_start([k["name"] for k in launches[s:s + p]])
    period = keys[r:r + p]
    pos = align(keys, period)
    layer = []
    for j, role in enumerate(roles([k[0] for k in period])):
        seen = [k for k, q in zip(launches, pos) if q == j]
        layer.append({**{f: seen[0][f] for f in ("name", "template", "grid", "block")}, "role": role,
                      "n": len(seen), "median_ns": statistics.median(k["ns"] for k in seen)})
    # launches outside the period, in groups (one per token boundary the window holds); one group is counted: the
    # longest of those not cut by the window's edges
    groups: list[list[int]] = []
    for i, q in enumerate(pos):
        if q is None:
            if groups and i - groups[-1][-1] <= p:
                groups[-1].append(i)
            else:
                groups.append([i])
    inner = [g for g in groups if g[0] > 0 and g[-1] < len(pos) - 1] or groups
    extra = [launches[i] for i in max(inner, key=len)] if inner else []
    mv = [k for k in extra if category(k["name"]) == "mat-vec"]
    out = max(mv, key=lambda m: int(m["grid"].strip("()").split(",")[0])) if mv else None
    for k in extra:  # the once-a-token mat-vec with the most rows is the output (lm_head) one
        k["role"] = "output" if k is out else ""
    cats = dict.fromkeys(CATEGORIES, 0.0)
    for k in layer:
        cats[category(k["name"])] += n_layers * k["median_ns"] / 1e3
    for k in extra:
        cats[category(k["name"])] += k["ns"] / 1e3
    return {"period": p, "layer": layer, "extra": extra, "boundaries": len(groups), "cats": cats,
            "layers_us": n_layers * sum(k["median_ns"] for k in layer) / 1e3,
            "extra_us": sum(k["ns"] for k in extra) / 1e3}


def label(path: str) -> str:
    return Path(path).stem.removeprefix("ncu-")


def markdown(res: dict[str, dict], n_layers: int, card: str, note: str = "") -> str:
    lines = [f"# Decode kernel time per token, {card} (ncu, serialized kernel durations)", ""]
    lines += [note, ""] if note else []
    lines += [f"µs per token: median over the layers seen of each kernel of the layer period × {n_layers} layers, "
              "plus the once-a-token kernels (launches outside the period, counted once). ncu runs every kernel alone: "
              "these are isolated per-kernel durations, not overlapped CUDA-graph time; launch gaps are not counted, "
              "and a small kernel alone costs ~2 µs, so the sums compare kernels rather than predict tok/s.",
              "", "| file | " + " | ".join(CATEGORIES) + " | total µs | layers µs | once-a-token µs "
              "| kernels/layer | tok/s at total |", "|" + "---|" * (len(CATEGORIES) + 6)]
    for f, b in res.items():
        tot = sum(b["cats"].values())
        lines.append(f"| {f} | " + " | ".join(f"{b['cats'][c]:.0f}" for c in CATEGORIES) +
                     f" | {tot:.0f} | {b['layers_us']:.0f} | {b['extra_us']:.0f} | {b['period']} | {1e6 / tot:.0f} |")
    # mat-vecs side by side, per role
    order = ["Q", "K", "V", "KV", "QKV", "O", "gate", "up", "gate+up", "FFN", "down"]
    lines += ["", "Mat-vec medians per layer (µs), by role (guessed from the place in the layer), and the output "
              "mat-vec once a token:", "", "| role | " + " | ".join(res) + " |", "|" + "---|" * (len(res) + 1)]
    for role in order + ["output"]:
        cells = []
        for b in res.values():
            ks = b["layer"] if role != "output" else b["extra"]
            us = [(k["median_ns"] if role != "output" else k["ns"]) / 1e3 for k in ks if k.get("role") == role]
            cells.append(" + ".join(f"{u:.1f}" for u in us) or "–")
        if any(c != "–" for c in cells):
            lines.append(f"| {role} | " + " | ".join(cells) + " |")
    for f, b in res.items():
        lines += ["", f"## {f}: one layer ({b['period']} kernels)", "",
                  "| pos | kernel | role | grid | median µs | n |", "|---|---|---|---|---|---|"]
        lines += [f"| {j} | {k['name']} | {k['role']} | {k['grid']} | {k['median_ns'] / 1e3:.2f} | {k['n']} |"
                  for j, k in enumerate(b["layer"])]
        seen = f" (the window holds {b['boundaries']} token boundaries; one is counted)" if b["boundaries"] > 1 else ""
        lines += ["", f"once a token{seen}: " + (", ".join(
            f"{k['name']}{' (' + k['role'] + ')' if k['role'] else ''} {k['grid']} {k['ns'] / 1e3:.1f}"
            for k in b["extra"]) or "none found in the window (only the layers are counted)")]
    return "\n".join(lines) + "\n"


def write_csv(res: dict[str, dict], path: str) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "pos", "kernel", "template", "grid", "block", "median_ns"])
        for f, b in res.items():
            w.writerows([f, j, k["name"], k["template"], k["grid"], k["block"], f"{k['median_ns']:.0f}"]
                        for j, k in enumerate(b["layer"]))
            # once-a-token launches: pos "token", their single time
            w.writerows([f, "token", k["name"], k["template"], k["grid"], k["block"], f"{k['ns']:.0f}"]
                        for k in b["extra"])


def plot(res: dict[str, dict], card: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = list(res)
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(files) + 2.2))
    left = [0.0] * len(files)
    for c, color in zip(CATEGORIES, ("tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:gray")):
        w = [res[f]["cats"][c] for f in files]
        ax.barh(files, w, left=left, color=color, label=c)
        left = [a + b for a, b in zip(left, w)]
    for y, tot in enumerate(left):
        ax.text(tot, y, f" {tot:.0f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left) * 1.1)
    ax.set_xlabel("µs per token (layers × median + once-a-token kernels)")
    ax.set_title(f"{card}: decode kernel time per token (ncu, serialized kernel durations)", fontsize=10)
    ax.legend(fontsize=8, ncol=len(CATEGORIES), loc="upper center", bbox_to_anchor=(0.5, -0.09 - 0.4 / len(files)),
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv_files", nargs="+")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--card", default="GPU")
    ap.add_argument("--note", default="", help="a line under the title, e.g. the ncu command")
    ap.add_argument("--md", default=None)
    ap.add_argument("--png", default=None)
    ap.add_argument("--csv-out", default=None)
    a = ap.parse_args()
    res = {}
    for f in a.csv_files:  # a dump cut short (timeout, ncu error) is named and left out, not the whole table
        try:
            res[label(f)] = breakdown(parse(Path(f).read_text()), a.layers)
        except (ValueError, KeyError) as e:
            print(f"{f}: skipped ({e})", file=sys.stderr)
    if not res:
        sys.exit("no dump with a repeating layer period")
    md = markdown(res, a.layers, a.card, a.note)
    if a.md:
        Path(a.md).write_text(md)
    if a.png:
        plot(res, a.card, a.png)
    if a.csv_out:
        write_csv(res, a.csv_out)
    print(md, end="")


if __name__ == "__main__":
    main()

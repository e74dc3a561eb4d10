"""docs/BENCHMARKS.md, its figure and the raw JSON, generated entirely from one run's rows.

Nothing here is hand-written per run: targets are checked, ratios computed and
the "where the time goes" text filled from the profiles, so the page always
says what the last run measured (and says so when it was a quick run).

Over 500 lines: one page's generator, a function per section; issue 17's sections
(peers on onnxruntime, slides, whole slide) are in report_scale.py.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.common import REPO

PACKAGES = ("leukodiff", "torch", "torchvision", "onnxruntime", "ultralytics", "numpy",
            "pillow", "opencv-python")
PEER_LABELS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": "torchvision fasterrcnn_mobilenet_v3_large_320_fpn "
                                             "(torch)",
    "fasterrcnn_mobilenet_v3_large_fpn": "torchvision fasterrcnn_mobilenet_v3_large_fpn (torch)",
    "yolov8n": "ultralytics YOLOv8n (torch)",
}
NA = "-"  # an empty cell
TARGET_MS, TARGET_VS_320, TARGET_VS_YOLO, TARGET_SCALING, TARGET_COLD_S = 30, 2.0, 1.0, 1.6, 3.0


# --- machine and versions --------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine(args: Any, load_before: list[float] | None, load_after: list[float] | None,
            total_s: float, fields: list[str]) -> dict:
    """What the run ran on and with: the page's header."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                   if line.startswith("MemTotal")), 0)
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
        "quick": args.quick, "threads": args.threads, "runs": args.runs, "warmup": args.warmup,
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 1024**2, 1),
        "os": platform.platform(), "python": platform.python_version(), "versions": versions,
        "commit": (_git("rev-parse", "--short", "HEAD") or "?") + (" + local changes"
                                                                   if dirty else ""),
        "load_before": load_before, "load_after": load_after, "total_s": total_s,
        "fields": [Path(f).name for f in fields],
    }


# --- helpers ---------------------------------------------------------------------------------


def _ok(rows: list[dict], section: str, name: str | None = None) -> dict | None:
    for row in rows:
        if row["section"] == section and (name is None or row["name"] == name) \
                and row["status"] == "ok":
            return row
    return None


def _f(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return NA if value is None else f"{value:,.{digits}f}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*out, ""]


def _why(rows: list[dict], section: str, name: str) -> str:
    for row in rows:
        if row["section"] == section and row["name"] == name:
            return f"{row['status']}: {row.get('reason', '')}"
    return "not run in this mode"


def _median(rows: list[dict], section: str, name: str) -> float | None:
    row = _ok(rows, section, name)
    return row["metrics"]["median_ms"] if row else None


def _scaling_pair(rows: list[dict]) -> tuple[dict | None, int]:
    row = _ok(rows, "scaling")
    if not row:
        return None, 0
    configs = row["metrics"]["configs"]
    size = max(r["fields"] for c in configs.values() for r in c["rows"])
    rates = {label: next(r["fields_per_s"] for r in c["rows"] if r["fields"] == size)
             for label, c in configs.items()}
    return rates, size


# --- sections --------------------------------------------------------------------------------


def targets(rows: list[dict]) -> list[str]:
    onnx, torch = _median(rows, "latency", "leukodiff onnx"), _median(rows, "latency",
                                                                     "leukodiff torch")
    p320 = _median(rows, "latency", "fasterrcnn_mobilenet_v3_large_320_fpn")
    yolo = _median(rows, "latency", "yolov8n")
    lines = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("**met**" if ok else "**missed**")

    lines.append(["full pipeline per field, onnxruntime, median", f"≤ {TARGET_MS} ms",
                  _f(onnx, 1, " ms") if onnx else _why(rows, "latency", "leukodiff onnx"),
                  verdict(None if onnx is None else onnx <= TARGET_MS)])
    for label, peer, need in (("fasterrcnn_mobilenet_v3_large_320_fpn", p320, TARGET_VS_320),
                              ("YOLOv8n on torch (full predict)", yolo, TARGET_VS_YOLO)):
        if onnx and peer:
            speedup = peer / onnx
            lines.append([f"leukodiff (onnxruntime) vs {label}", f"≥ {need:g}x faster",
                          f"{speedup:.2f}x ({onnx:.1f} vs {peer:.1f} ms)",
                          verdict(speedup >= need)])
        else:
            missing = "leukodiff onnx" if not onnx else (
                "yolov8n" if "YOLO" in label else "fasterrcnn_mobilenet_v3_large_320_fpn")
            lines.append([f"leukodiff (onnxruntime) vs {label}", f"≥ {need:g}x faster",
                          _why(rows, "latency", missing), "n/a"])
    rates, size = _scaling_pair(rows)
    multi = [label for label in rates or {} if not label.startswith("1 worker")]
    if rates and multi and "1 worker x 1 thread" in rates:
        label = multi[0]
        ratio = rates[label] / rates["1 worker x 1 thread"]
        note = (f"{ratio:.2f}x on {size:,} fields ({rates[label]:.1f} vs "
                f"{rates['1 worker x 1 thread']:.1f} fields/s)")
        if size < 1000:
            note += "; fewer than 1,000 fields: not judged"
        lines.append([f"throughput, {label} vs 1 worker x 1 thread",
                      f"≥ {TARGET_SCALING}x on 1,000 fields", note,
                      verdict(ratio >= TARGET_SCALING if size >= 1000 else None)])
    else:
        name = next((r["name"] for r in rows if r["section"] == "scaling"), "scaling")
        why = ("run with --threads 1: no multi-worker configuration" if rates
               else _why(rows, "scaling", name))
        lines.append(["throughput, 2 workers vs 1", f"≥ {TARGET_SCALING}x on 1,000 fields",
                      why, "n/a"])
    cold = _ok(rows, "coldstart", "leukodiff analyze --backend onnx")
    lines.append(["`leukodiff analyze` one field, cold, onnxruntime", f"≤ {TARGET_COLD_S:g} s",
                  _f(cold["metrics"]["median_s"], 2, " s") if cold else
                  _why(rows, "coldstart", "leukodiff analyze --backend onnx"),
                  verdict(None if not cold else cold["metrics"]["median_s"] <= TARGET_COLD_S)])
    if torch:
        lines.append(["(for reference) full pipeline per field, torch, median", NA,
                      _f(torch, 1, " ms"), ""])
    return _table(["target", "goal", "measured", "verdict"], lines)


def latency(rows: list[dict]) -> list[str]:
    table = []
    for row in rows:
        if row["section"] != "latency":
            continue
        name = PEER_LABELS.get(row["name"], row["name"])
        if row["status"] != "ok":
            table.append([name, "", row["status"], "", "", "", "", "", row.get("reason", "")])
            continue
        m = row["metrics"]
        found = m.get("cells_per_field", m.get("detections_per_field"))
        if row["name"].startswith("leukodiff"):
            what = f"{m['image_size'][0]}x{m['image_size'][1]} native, white cells"
            notes = (f"level 1 alone {m['level1_median_ms']:.1f} ms"
                     if "level1_median_ms" in m else "")
        elif row["name"] == "yolov8n":
            split = m.get("split_median_ms", {})
            what = f"imgsz 640 (input {m.get('network_input', '?')}), detections"
            notes = "full predict; " + ", ".join(f"{k} {v:.1f} ms" for k, v in split.items())
        else:
            resize = m["resize"]
            what = f"network input {m['network_input']}, detections"
            notes = ("torchvision's own resize (320 short side)" if isinstance(resize, str)
                     else f"min_size {resize['min_size']}, max_size {resize['max_size']}")
        table.append([name, "ok", _f(m["median_ms"]), _f(m["p90_ms"]),
                      _f(1000 / m["median_ms"]), _f(m["cpu_ms_per_field"]),
                      _f(row.get("peak_rss_mb"), 0), f"{_f(found, 2)} ({what})", notes])
    out = _table(["system", "status", "median ms", "p90 ms", "fields/s", "CPU ms/field",
                  "peak RSS MiB", "found per field", "notes"], table)
    ratios = []
    leuko = {b: _median(rows, "latency", f"leukodiff {b}") for b in ("onnx", "torch")}
    for peer in ("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
                 "yolov8n"):
        peer_ms = _median(rows, "latency", peer)
        if peer_ms is None:
            ratios.append([PEER_LABELS[peer], NA, _why(rows, "latency", peer), ""])
            continue
        cells = [PEER_LABELS[peer], _f(peer_ms)]
        for backend in ("onnx", "torch"):
            ms = leuko[backend]
            cells.append(NA if ms is None else
                         f"{ms / peer_ms:.2f} ({peer_ms / ms:.2f}x faster)" if ms <= peer_ms
                         else f"{ms / peer_ms:.2f} ({ms / peer_ms:.2f}x slower)")
        ratios.append(cells)
    out += ["**Ratios**, leukodiff time / peer time per field (median; below 1: leukodiff is "
            "faster):", ""]
    out += _table(["peer", "peer median ms", "leukodiff onnxruntime / peer",
                   "leukodiff torch / peer"], ratios)
    return out


def level2(rows: list[dict]) -> list[str]:
    table = []
    for row in rows:
        if row["section"] != "level2":
            continue
        backend = row["name"].removeprefix("level 2 ")
        if row["status"] != "ok":
            table.append(["both", backend, "", row["status"], row.get("reason", ""), "", "",
                          ""])
            continue
        for r in row["metrics"]["rows"].values():
            table.append([r["model"], backend, r["batch"], _f(r["crops_per_s"], 0),
                          _f(r["median_ms"], 2), _f(r["p90_ms"], 2), _f(r["cpu_ms_per_crop"], 2),
                          _f(row.get("peak_rss_mb"), 0)])
    return _table(["model", "backend", "batch", "crops/s (median)", "median ms/batch",
                   "p90 ms/batch", "CPU ms/crop", "peak RSS MiB (both models)"], table)


def coldstart(rows: list[dict]) -> list[str]:
    table = []
    for row in rows:
        if row["section"] != "coldstart":
            continue
        if row["status"] != "ok":
            table.append([row["name"], row["status"], row.get("reason", ""), "", "", "", ""])
            continue
        m = row["metrics"]
        table.append([row["name"], "ok", _f(m["median_s"], 2), _f(m["min_s"], 2),
                      _f(m["max_s"], 2), len(m["runs_s"]), _f(row.get("peak_rss_mb"), 0)])
    out = _table(["command", "status", "median s", "min s", "max s", "runs", "peak RSS MiB"],
                 table)
    split = []
    for backend in ("onnx", "torch"):
        row = _ok(rows, "latency", f"leukodiff {backend}")
        if row:
            s = row["metrics"]["startup_s"]
            split.append([backend, *(_f(v, 3) for v in s.values()),
                          _f(row.get("child_wall_s"), 1)])
    if split:
        out += ["In-process split (from the latency subprocesses, seconds after interpreter "
                "start):", ""]
        out += _table(["backend", "import leukodiff.pipeline", "Analyzer.load",
                       "first field", "whole subprocess (incl. timed runs)"], split)
    return out


def scaling(rows: list[dict]) -> list[str]:
    row = _ok(rows, "scaling")
    if not row:
        name = next((r["name"] for r in rows if r["section"] == "scaling"), "scaling")
        return [f"Not measured ({_why(rows, 'scaling', name)}).", ""]
    m = row["metrics"]
    table = []
    for label, config in m["configs"].items():
        for r in config["rows"]:
            table.append([label, f"{r['fields']:,}", _f(r["wall_s"], 2),
                          _f(r["fields_per_s"]), _f(r["cpu_s"], 2),
                          _f(r["cpu_s_per_1000_fields"])])
    out = [f"Backend: {m['backend']}; {m['distinct_fields']} distinct fields, repeated to fill "
           "the batch.", ""]
    out += _table(["configuration", "fields", "wall s", "fields/s", "CPU-s (user+sys)",
                   "CPU-s per 1,000 fields"], table)
    rates, size = _scaling_pair(rows)
    if rates:
        base = rates.get("1 worker x 1 thread")
        speed = [[label, _f(rate), f"{rate / base:.2f}x" if base else NA]
                 for label, rate in rates.items()]
        out += [f"Throughput on {size:,} fields, relative to 1 worker x 1 thread:", ""]
        out += _table(["configuration", "fields/s", "speed-up"], speed)
    startup = [[label, _f(c["startup_s"], 2),
                ", ".join(_f(v, 0) for v in c["worker_peak_rss_mb"] if v is not None)]
               for label, c in m["configs"].items()]
    out += ["Pool start (spawn, Analyzer.load and two warm-up fields per worker) and each "
            "worker's peak RSS:", ""]
    out += _table(["configuration", "start s", "worker peak RSS MiB"], startup)
    return out


def training(rows: list[dict]) -> list[str]:
    table = []
    for row in rows:
        if row["section"] != "training":
            continue
        if row["status"] != "ok":
            table.append([row["name"], row["status"], row.get("reason", ""), "", "", "", "", "",
                          "", "", ""])
            continue
        m = row["metrics"]
        rss = _f(row.get("peak_rss_mb"), 0)
        recorded = m.get("recorded_epoch_s")
        recorded_text = _f(recorded, 1) + (f" ({m['recorded_device']})"
                                           if "recorded_device" in m else "")
        if "train_cells" in m:  # level 2
            if m["mode"] == "frozen":
                per_step, steps = NA, NA
                one_off = f"feature cache {m['feature_cache_s']:.1f} s (extrapolated)"
                how = "one whole epoch, measured"
            else:
                per_step, steps = _f(m["step_s"], 3), m["steps_per_epoch"]
                one_off = NA
                how = f"{m['timed_steps']} steps timed, extrapolated (+ val {m['val_s']:.1f} s)"
            total = (m["epoch_s"] * m["epochs_shipped_config"]
                     + m.get("feature_cache_s", 0.0)) / 60
            table.append([f"level 2 {m['task']}", m["mode"], f"{m['train_cells']:,} cells",
                          per_step, steps, _f(m["epoch_s"], 2 if m["epoch_s"] < 1 else 1),
                          one_off,
                          f"{m['epochs_shipped_config']} → {total:.1f} min", recorded_text,
                          rss, how])
        else:  # detector
            total = (m["epoch_s"] * m["epochs_shipped_config"]
                     + m["val_s"] * m["epochs_shipped_config"] / m["val_every"]) / 60
            table.append(["level 1 detector (Faster R-CNN)", "fine-tune (shipped config)",
                          f"{m['fields_per_epoch']} fields drawn of {m['train_fields']}",
                          _f(m["step_s"], 2), m["steps_per_epoch"], _f(m["epoch_s"], 1),
                          f"decode fields {m['decode_once_s']:.1f} s; val {m['val_s']:.1f} s "
                          f"every {m['val_every']} epochs",
                          f"{m['epochs_shipped_config']} → {total:.1f} min", recorded_text,
                          rss, f"{m['timed_steps']} steps timed, extrapolated"])
            group = m.get("group_classifier")
            if group:
                gtotal = group["epoch_s"] * group["epochs_shipped_config"] / 60
                table.append(["level 1 group classifier", "fine-tuned",
                              f"{group['cells_per_epoch']:,} cells", _f(group["step_s"], 3),
                              group["steps_per_epoch"], _f(group["epoch_s"], 1), NA,
                              f"{group['epochs_shipped_config']} → {gtotal:.1f} min", NA,
                              "(same process)", f"{m['timed_steps']} steps timed, extrapolated"])
    if not table:
        return ["Not measured in this mode (training is left out of quick runs).", ""]
    return _table(["model", "mode", "data per epoch", "s/step", "steps/epoch", "s/epoch",
                   "one-off", "epochs (shipped config) → total", "recorded s/epoch (shipped "
                   "model's history)", "peak RSS MiB", "how"], table)


def profiles(rows: list[dict]) -> list[str]:
    out: list[str] = []
    for backend in ("onnx", "torch"):
        row = _ok(rows, "latency", f"leukodiff {backend}")
        if row and "level1_median_ms" in row["metrics"]:
            m = row["metrics"]
            level1 = m["level1_median_ms"]
            rest = max(m["median_ms"] - level1, 0.0)
            out.append(f"- **{backend}**: {m['median_ms']:.1f} ms per field = level 1 "
                       f"(detector, NMS, group classifier) {level1:.1f} ms "
                       f"({100 * level1 / m['median_ms']:.0f}%) + level 2 and the rest "
                       f"{rest:.1f} ms, with {m['cells_per_field']:.2f} white cells per field.")
    if out:
        out.append("")
    onnx = _ok(rows, "profile", "onnxruntime profiler")
    if onnx:
        out += [f"onnxruntime's profiler ({onnx['metrics']['tool']}), per graph run, top "
                "operator types:", ""]
        table = []
        for name, m in onnx["metrics"]["models"].items():
            ops = ", ".join(f"{o['op']} {o['ms_per_run']:.1f} ms ({100 * o['share']:.0f}%)"
                            for o in m["top_ops"][:5])
            table.append([name, _f(m["ms_per_run"], 2), ops])
        out += _table(["graph", "ms per run (operators)", "top operator types"], table)
    else:
        out += [f"onnxruntime profile: {_why(rows, 'profile', 'onnxruntime profiler')}", ""]
    torch = _ok(rows, "profile", "torch.profiler, torch pipeline")
    if torch:
        m = torch["metrics"]
        out += [f"{m['tool']} over {m['fields']} fields of the torch-backend pipeline, "
                "operators by self CPU time:", ""]
        out += _table(["operator", "self CPU ms per field", "share", "calls per field"],
                      [[f"`{o['op']}`", _f(o["self_cpu_ms_per_field"], 2),
                        f"{100 * o['share']:.0f}%", _f(o["calls_per_field"], 1)]
                       for o in m["top_ops"]])
    else:
        out += [f"torch profile: {_why(rows, 'profile', 'torch.profiler, torch pipeline')}", ""]
    return out


def problems(rows: list[dict]) -> list[str]:
    bad = [r for r in rows if r["status"] != "ok"]
    attempts = [a for r in rows for a in r.get("network_attempts", [])]
    out = [f"- {r['section']} / {r['name']}: **{r['status']}**: {r.get('reason', '')}"
           for r in bad]
    out.append(f"- Network connections attempted by any measured process: {len(attempts)}"
               + (f" ({', '.join(attempts[:5])})" if attempts else "") +
               " (every child refuses IP connections; none is needed).")
    return [*out, ""]


# --- figure ----------------------------------------------------------------------------------


def figure(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(PEER_LABELS.get(r["name"], r["name"]).replace("torchvision ", ""),
             r["metrics"]["median_ms"], r["metrics"]["p90_ms"])
            for r in rows if r["section"] == "latency" and r["status"] == "ok"]
    scale = _ok(rows, "scaling")
    panels = 1 + (scale is not None)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    if bars:
        names, medians, p90s = zip(*bars, strict=True)
        ys = range(len(names))
        ax.barh([y - 0.2 for y in ys], medians, height=0.4, label="median")
        ax.barh([y + 0.2 for y in ys], p90s, height=0.4, label="p90", alpha=0.6)
        for y, value in zip(ys, medians, strict=True):
            ax.annotate(f"{value:.0f}", (value, y - 0.2), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=7)
        ax.set_xscale("log")  # the peers span an order of magnitude
        ax.set_yticks(list(ys), names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(TARGET_MS, color="grey", linestyle="--", label=f"{TARGET_MS} ms target")
        ax.legend(fontsize=8)
    ax.set_xlabel("ms per 640x480 field, log scale (lower is better)")
    ax.set_title("Per-field latency, same fields, same threads", fontsize=10)
    if scale is not None:
        ax = axes[0][1]
        for label, config in scale["metrics"]["configs"].items():
            sizes = [r["fields"] for r in config["rows"]]
            ax.plot(sizes, [r["fields_per_s"] for r in config["rows"]], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("fields in the batch")
        ax.set_ylabel("fields per second")
        ax.set_title(f"Throughput ({scale['metrics']['backend']} backend)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the page --------------------------------------------------------------------------------


def markdown(rows: list[dict], meta: dict, figure_name: str) -> str:
    v = meta["versions"]
    load = meta["load_before"]
    busy = load is not None and load[0] > 0.25 * (meta["cores"] or 1)
    lines = ["# leukodiff benchmarks", ""]
    lines.append(f"Generated by `{meta['command']}` on {meta['date']} in "
                 f"{meta['total_s'] / 60:.1f} min; every figure below comes from that one run "
                 "(rerun the command to refresh this page; do not edit it by hand).")
    lines.append("")
    if meta["quick"]:
        lines += ["> **Quick run (smoke test)**: a few fields and runs, no training. The "
                  "numbers only show that every part works; run `python -m benchmarks.run` "
                  "on an idle machine for real figures.", ""]
    if busy:
        lines += [f"> **Warning**: 1-minute load average was {load[0]} when the run started: "
                  "the machine was not idle, so timings are pessimistic and noisy.", ""]
    goals = targets(rows)
    missed = [line.split(" | ")[0].removeprefix("| ") for line in goals if "**missed**" in line]
    from benchmarks import report_scale

    lines += ["## Targets (issue #8)", "", *goals]
    lines += ["## Targets (issue #17)", "",
              "Ratios from this run; a figure measured at smaller sizes than the target names "
              "(a quick run) is shown but not judged.", "", *report_scale.targets(rows)]
    lines += ["## Machine and versions", ""]
    lines += _table(["", ""], [
        ["CPU", f"{meta['cpu']}, {meta['cores']} cores"],
        ["memory", f"{meta['memory_gib']} GiB"], ["OS", meta["os"]],
        ["Python", meta["python"]],
        ["packages", ", ".join(f"{k} {val}" for k, val in v.items())],
        ["leukodiff commit", meta["commit"]],
        ["threads", f"{meta['threads']} for every system (torch.set_num_threads, "
                    "onnxruntime intra_op_num_threads, OMP/MKL/OpenBLAS variables)"],
        ["runs", f"{meta['warmup']} warm-up, then {meta['runs']} timed runs per system"],
        ["fields", f"{len(meta['fields'])} BCCD VOC-test fields with a white cell "
                   f"({meta['fields'][0]} … {meta['fields'][-1]}), 640x480, decoded once"],
        ["load average (1, 5, 15 min)", f"before {meta['load_before']}, after "
                                        f"{meta['load_after']}"],
    ])
    lines += ["## 1. Whole pipeline and peers: time per field", "",
              "Each system runs in its own fresh process on the same decoded fields (PIL RGB), "
              "cycling through them: warm-up runs, then timed runs, each timed from the decoded "
              "image to the result, so tensor conversion, resizing, pre- and post-processing "
              "(NMS) count for everyone. leukodiff = level 1 (Faster R-CNN on "
              "MobileNetV1-0.5 + group classifier) and level 2 (a MobileNetV1-0.5 classifier "
              "on every cell found). Peers run with random weights and no download (speed does "
              "not depend on weights; with random weights they find almost nothing, so their "
              "NMS is if anything cheaper than a trained model's); torchvision models as "
              "shipped (91 COCO classes), YOLOv8n built from `yolov8n.yaml` (80 classes), "
              "timed over ultralytics' full `predict` (letterbox, inference, NMS). The peers "
              "here run **on torch** while leukodiff's first row runs on onnxruntime: "
              "section 7 compares every system on onnxruntime.", ""]
    lines += latency(rows)
    lines += [f"![latency and throughput](figures/{figure_name})", ""]
    lines += ["## 2. Level 2 alone: crops per second", "",
              "Both level-2 classifiers on real BCCD white-cell crops (128x128, cut as the "
              "pipeline cuts them), float32 in [0, 1], NCHW (channels_last in torch, inference "
              "mode).", ""]
    lines += level2(rows)
    lines += ["## 3. Cold start", "",
              "Wall time of `leukodiff analyze FIELD --out DIR` from process start to exit "
              "(interpreter, imports, model load, one field, and writing its report), OS file "
              "cache warm; peak RSS of that process.", ""]
    lines += coldstart(rows)
    lines += ["## 4. Scaling with worker processes", "",
              "A spawn pool of workers, each loading the Analyzer once (two warm-up fields), "
              "analyses a batch of field paths (JPEG decoding included, as `leukodiff analyze` "
              "of a folder does). On 2 cores the fair comparisons are *1 worker x 2 threads* "
              "vs *2 workers x 1 thread* (same CPU), and *2 workers x 1 thread* vs *1 worker x "
              "1 thread* (the issue's scaling target). CPU-s: user+sys of the workers (from "
              "/proc, idle thread spinning included) and of the driver.", ""]
    lines += scaling(rows)
    lines += ["## 5. Training cost", "",
              "Seconds per epoch on this CPU with the project's own training code "
              "(`leukodiff.training`), from a few timed steps after a warm-up step, "
              "extrapolated to an epoch with the data sizes the shipped models' manifests "
              "record; the frozen mode's head epoch is measured whole (its backbone features "
              "are cached once: the one-off cost). Level-2 pixels are random (the cost does "
              "not depend on them); the detector trains on the real BCCD fields from the "
              "shipped weights. *Recorded* is the median epoch time in the shipped model's "
              "own training history (its machine, device when recorded).", ""]
    lines += training(rows)
    lines += ["## 6. Where the time goes", ""]
    if missed:
        lines += ["Targets missed in this run: " + "; ".join(missed) + ". The stage split and "
                  "the profilers below show where the time goes.", ""]
    lines += profiles(rows)
    lines += report_scale.sections(rows)
    lines += ["## Skipped and failed", "", *problems(rows)]
    lines += ["## Reproduce", "", "```bash",
              "make bench            # installs the bench extra (ultralytics), runs the suite",
              "# or by hand:",
              "pip install -e '.[bench]'",
              "python -m benchmarks.run               # full: ~25-30 min on 2 idle cores (--plan)",
              "python -m benchmarks.run --quick --out /tmp/bench   # smoke test, ~3 min",
              "```", "",
              f"Raw results of this run: `figures/{Path(figure_name).stem}.json`.", ""]
    return "\n".join(lines)


def write(rows: list[dict], meta: dict, out: Path) -> list[Path]:
    """BENCHMARKS.md, figures/benchmarks.png and figures/benchmarks.json under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    figure_path = figure(rows, out / "figures" / "benchmarks.png")
    json_path = out / "figures" / "benchmarks.json"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    page = out / "BENCHMARKS.md"
    page.write_text(markdown(rows, meta, figure_path.name))
    return [page, figure_path, json_path]

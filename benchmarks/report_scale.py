"""The page's issue-17 parts: peers on onnxruntime, slides with workers, memory with size,
and the synthetic whole slide; with the issue's targets as ratios from the same run.

Kept apart from report.py (issue 8's sections) so that neither grows past 500 lines.
"""

from __future__ import annotations

from benchmarks.report import NA, _f, _ok, _table, _why

TARGET_WORKERS, TARGET_RAY = 1.8, 0.15  # 2 workers vs 1; Ray vs the process pool
TARGET_RSS_RATIO, TARGET_WSI_RSS_MB, TARGET_WSI_MP = 1.2, 2048, 1.25
ONNX_LABELS = {
    "leukodiff": "leukodiff (shipped ONNX: detector + group + level 2)",
    "yolov8n": "ultralytics YOLOv8n",
    "yolo11n": "ultralytics YOLO11n",
    "fasterrcnn_mobilenet_v3_large_320_fpn": "torchvision fasterrcnn_mobilenet_v3_large_320_fpn",
}


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def _onnx_rows(rows: list[dict]) -> dict[int, dict[str, dict]]:
    """{threads: {system: row}} of the ok onnx timing rows."""
    out: dict[int, dict[str, dict]] = {}
    for row in rows:
        if row["section"] != "onnx" or row["status"] != "ok" or "median_ms" not in row.get(
                "metrics", {}):
            continue
        system = row["name"].split(" onnx")[0]
        out.setdefault(row["spec"]["threads"], {})[system] = row
    return out


def targets(rows: list[dict]) -> list[str]:
    """Issue 17's targets: each a ratio measured in this run, or why it is missing."""
    lines = []
    for threads, systems in sorted(_onnx_rows(rows).items()):
        ours, yolo = systems.get("leukodiff"), systems.get("yolov8n")
        goal = "faster (ratio > 1)"
        label = f"leukodiff vs YOLOv8n, both onnxruntime, {threads} thread(s), per field"
        if ours and yolo:
            a, b = ours["metrics"]["median_ms"], yolo["metrics"]["median_ms"]
            lines.append([label, goal, f"{b / a:.2f}x ({a:.1f} vs {b:.1f} ms)",
                          _verdict(a < b)])
        else:
            lines.append([label, goal, "not measured (see section 7)", "n/a"])
    if not _onnx_rows(rows):
        lines.append(["leukodiff vs YOLOv8n, both onnxruntime", "faster",
                      _why(rows, "onnx", "yolov8n onnx, 1 thread"), "n/a"])
    workers = _ok(rows, "slides")
    configs = workers["metrics"].get("configs", {}) if workers else {}
    if "1 worker" in configs and "2 workers" in configs:
        one, two = configs["1 worker"]["fields_per_s"], configs["2 workers"]["fields_per_s"]
        fields = workers["metrics"]["fields"]
        judged = fields >= 1000
        lines.append([f"`analyze --slides`: 2 workers vs 1, {fields:,} fields",
                      f"≥ {TARGET_WORKERS}x on 1,000 fields",
                      f"{two / one:.2f}x ({two:.1f} vs {one:.1f} fields/s)"
                      + ("" if judged else "; fewer than 1,000 fields: not judged"),
                      _verdict(two / one >= TARGET_WORKERS if judged else None)])
        ray = configs.get("Ray, 2 workers (local)")
        ray_text = (f"{ray['fields_per_s'] / two:.2f} of the pool's throughput" if ray
                    else workers["metrics"]["skipped"].get("Ray", "not run"))
        lines.append(["Ray on the local cores vs the process pool",
                      f"within {100 * TARGET_RAY:.0f}%", ray_text,
                      _verdict(abs(ray["fields_per_s"] / two - 1) <= TARGET_RAY if ray
                               else None)])
    else:
        lines.append(["`analyze --slides`: 2 workers vs 1", f"≥ {TARGET_WORKERS}x",
                      _why(rows, "slides", next((r["name"] for r in rows
                                                 if r["section"] == "slides"), "")), "n/a"])
    memory = next((r for r in rows if r["section"] == "slides" and r["status"] == "ok"
                   and "sizes" in r.get("metrics", {})), None)
    if memory:
        sizes = memory["metrics"]["sizes"]
        small, large = min(sizes, key=int), max(sizes, key=int)
        a, b = sizes[small]["tree_peak_rss_mb"], sizes[large]["tree_peak_rss_mb"]
        judged = int(small) >= 500 and int(large) >= 10_000
        lines.append([f"peak RSS (process tree), {int(large):,} vs {int(small):,} fields",
                      f"≤ {TARGET_RSS_RATIO}x (10,000 vs 500)",
                      f"{b / a:.2f}x ({b:.0f} vs {a:.0f} MiB)"
                      + ("" if judged else "; smaller sizes: not judged"),
                      _verdict(b / a <= TARGET_RSS_RATIO if judged else None)])
    wsi = _ok(rows, "wholeslide", "analyze the synthetic slide")
    if wsi:
        m = wsi["metrics"]
        judged = m["side"] >= 50_000
        note = "" if judged else f"; a {m['side']:,} px slide: not judged"
        lines.append([f"whole slide {m['side']:,} px: every known cell found once",
                      "all, no double count",
                      f"{m['found_once']}/{m['known_cells']} (missed {m['missed']}, "
                      f"double {m['double_counted']}){note}",
                      _verdict(m["found_once"] == m["known_cells"] if judged else None)])
        lines.append(["whole slide: peak RSS of the analysis", f"≤ {TARGET_WSI_RSS_MB} MiB",
                      f"{m['slide_peak_rss_mb']:.0f} MiB{note}",
                      _verdict(m["slide_peak_rss_mb"] <= TARGET_WSI_RSS_MB if judged
                               else None)])
        ratio = m["s_per_mp_tissue"] / m["s_per_mp_field"]
        lines.append(["whole slide: time per megapixel of smear vs per-field analysis",
                      f"≤ {TARGET_WSI_MP}x",
                      f"{ratio:.2f}x ({m['s_per_mp_tissue']:.3f} vs {m['s_per_mp_field']:.3f} "
                      f"s/MP){note}", _verdict(ratio <= TARGET_WSI_MP if judged else None)])
    else:
        lines.append(["whole slide 50,000 px", "cells once, ≤ 2 GB, time/MP ≤ 1.25x",
                      _why(rows, "wholeslide", "analyze the synthetic slide"), "n/a"])
    return _table(["target", "goal", "measured", "verdict"], lines)


def onnx_peers(rows: list[dict]) -> list[str]:
    table = []
    for row in rows:
        if row["section"] != "onnx":
            continue
        m = row.get("metrics", {})
        if row["status"] != "ok":
            table.append([row["name"], row["status"], "", "", "", "", "", "",
                          row.get("reason", "")])
            continue
        if "median_ms" not in m:  # the export row
            continue
        system = row["name"].split(" onnx")[0]
        found = m.get("cells_per_field", m.get("detections_per_field"))
        if system == "leukodiff":
            notes = f"level 1 alone {m['level1_median_ms']:.1f} ms" if "level1_median_ms" in m \
                else ""
        else:
            split = m.get("split_median_ms", {})
            notes = m.get("how", "") + ("; " + ", ".join(f"{k} {v:.1f} ms"
                                                         for k, v in split.items())
                                        if split else "")
        table.append([ONNX_LABELS.get(system, system), str(row["spec"]["threads"]),
                      _f(m["median_ms"]), _f(m["p90_ms"]), _f(1000 / m["median_ms"]),
                      _f(m["cpu_ms_per_field"]), _f(row.get("peak_rss_mb"), 0),
                      _f(found, 2), notes])
    out = _table(["system (onnxruntime)", "threads", "median ms", "p90 ms", "fields/s",
                  "CPU ms/field", "peak RSS MiB", "found per field", "notes"], table)
    export = _ok(rows, "onnx", "export the peers to ONNX")
    if export:
        out += ["Exports (this run): " + "; ".join(
            f"{name}: {e['exporter']}, {e['mb']:.1f} MB" if isinstance(e, dict)
            else f"{name}: {e}" for name, e in export["metrics"].items()) + ".", ""]
    ratios = []
    for threads, systems in sorted(_onnx_rows(rows).items()):
        ours = systems.get("leukodiff")
        for system, row in systems.items():
            if system == "leukodiff" or not ours:
                continue
            a, b = ours["metrics"]["median_ms"], row["metrics"]["median_ms"]
            ratios.append([ONNX_LABELS.get(system, system), threads, _f(b),
                           f"{a / b:.2f} ({b / a:.2f}x " + ("faster)" if a <= b else
                                                           "slower)")])
    if ratios:
        out += ["**Ratios**, leukodiff time / peer time per field, same runtime, same "
                "threads (below 1: leukodiff is faster):", ""]
        out += _table(["peer", "threads", "peer median ms", "leukodiff / peer"], ratios)
    return out


def slides(rows: list[dict]) -> list[str]:
    out: list[str] = []
    for row in rows:
        if row["section"] != "slides":
            continue
        if row["status"] != "ok":
            out += [f"{row['name']}: {row['status']}: {row.get('reason', '')}", ""]
            continue
        m = row["metrics"]
        if "configs" in m:
            out += [f"Throughput, {m['fields']:,} fields in slides of {m['per_slide']} "
                    "(one `leukodiff analyze` process per configuration, start to exit):",
                    ""]
            one = m["configs"].get("1 worker", {}).get("fields_per_s")
            out += _table(["configuration", "command", "wall s", "fields/s", "vs 1 worker",
                           "CPU ms/field", "peak RSS, process tree MiB"],
                          [[label, f"`{r['command']}`", _f(r["wall_s"], 1),
                            _f(r["fields_per_s"], 1),
                            f"{r['fields_per_s'] / one:.2f}x" if one else NA,
                            _f(1000 * r["cpu_s"] / m["fields"], 0) if "cpu_s" in r else NA,
                            _f(r["tree_peak_rss_mb"], 0)]
                           for label, r in m["configs"].items()])
            out += [f"- {name}: not run ({why})." for name, why in m["skipped"].items()]
            out += [""] if m["skipped"] else []
        else:
            out += [f"Memory with the size of the run (workers: {m['workers']}; slides of "
                    f"{m['per_slide']} fields):", ""]
            out += _table(["fields", "wall s", "fields/s", "CPU ms/field",
                           "peak RSS, process tree MiB", "largest process peak MiB"],
                          [[f"{int(n):,}", _f(r["wall_s"], 1), _f(r["fields_per_s"], 1),
                            _f(1000 * r["cpu_s"] / int(n), 0) if "cpu_s" in r else NA,
                            _f(r["tree_peak_rss_mb"], 0), _f(r["largest_process_peak_mb"], 0)]
                           for n, r in m["sizes"].items()])
    return out or ["Not measured in this run.", ""]


def wholeslide(rows: list[dict]) -> list[str]:
    built = _ok(rows, "wholeslide", "build the synthetic slide")
    row = _ok(rows, "wholeslide", "analyze the synthetic slide")
    out: list[str] = []
    if built:
        b = built["metrics"]
        out += [f"The slide: {b['side']:,} x {b['side']:,} px ({b['megapixels']:,.0f} MP), "
                f"{len(b['levels'])} levels, tiled zlib TIFF of {b['file_mb']:.0f} MB, built in "
                f"{b['build_s']:.0f} s; {b['pasted_fields']} fields pasted "
                f"({b['distinct_fields']} distinct BCCD VOC-test fields with one white cell "
                "well inside), the rest plain background.", ""]
    if not row:
        return [*out, "Not measured: " + _why(rows, "wholeslide", "analyze the synthetic slide"),
                ""]
    m = row["metrics"]
    out += _table(["", ""], [
        ["known cells (annotated, and found when the field is analysed alone)",
         f"{m['known_cells']} (annotated but missed per field: "
         f"{m['annotated_not_found_per_field']})"],
        ["found exactly once on the slide", str(m["found_once"])],
        ["missed / double-counted", f"{m['missed']} / {m['double_counted']}"],
        ["white cells on the slide (any)", str(m["cells_on_slide"])],
        ["detector windows read; field-size blocks read / skipped as background",
         f"{m['windows_read']:,}; {m.get('blocks_read', m['windows_read']):,} / "
         f"{m['windows_skipped']:,}"],
        ["microns per pixel", f"{m['mpp']} ({m['mpp_source']}); windows shrunk "
                              f"{m['shrink']:.2f}x"],
        ["analysis wall time", f"{m['slide_s']:.1f} s ({m['threads']} thread(s), onnxruntime)"],
        ["peak RSS of the analysing process", f"{m['slide_peak_rss_mb']:.0f} MiB (before the "
                                              f"slide: {m['rss_before_slide_mb']:.0f} MiB)"],
        ["s per MP of smear (the pasted fields)", _f(m["s_per_mp_tissue"], 3)],
        ["s per MP read (the detector's windows; they overlap)", _f(m["s_per_mp_read"], 3)],
        ["s per MP of the whole slide (background included)", _f(m["s_per_mp_slide"], 4)],
        ["per-field analysis, same fields, same Analyzer", f"{m['field_ms']:.1f} ms per field "
                                                           f"= {m['s_per_mp_field']:.3f} s/MP"],
    ])
    return out


def sections(rows: list[dict]) -> list[str]:
    """Sections 7-9 of the page, with the text that says how each was measured."""
    out: list[str] = []
    out += ["## 7. Peers on onnxruntime: like with like", "",
            "Every system on onnxruntime (CPU execution provider, intra-op threads = the "
            "row's threads, one inter-op thread), at 1 and 2 threads, on the same decoded "
            "fields at their own size (640x480: 640 px long side, no resize for anyone). "
            "YOLOv8n and YOLO11n are built from ultralytics' `yolov8n.yaml` / "
            "`yolo11n.yaml` and exported by ultralytics' own exporter "
            "(`export(format='onnx', imgsz=[480, 640])`, its onnxslim pass included), then "
            "timed over ultralytics' `predict` on the ONNX file (letterbox, onnxruntime, "
            "NMS; its session replaced by one with the row's threads). torchvision's "
            "fasterrcnn_mobilenet_v3_large_320_fpn (min_size 480, max_size 640) is exported "
            "by `torch.onnx.export`; its graph holds the resize, normalisation and NMS. "
            "Weights are random (nothing is downloaded; speed does not depend on weights, "
            "and random weights find almost nothing, so the peers' NMS is if anything "
            "cheaper than a trained model's).", ""]
    out += onnx_peers(rows)
    out += ["## 8. Slides: workers and memory", "",
            "`leukodiff analyze --slides` as a user runs it, on folders of BCCD VOC-test "
            "fields (the distinct fields copied once to a temporary folder, then hard-linked "
            "as often as needed), every report, CSV/Parquet and thumbnail written; the "
            "output is deleted after each run. Time: the whole command, start to exit. "
            "Memory: the resident set of the command and its workers together, sampled "
            "every 0.25 s.", ""]
    out += slides(rows)
    out += ["## 9. A synthetic whole slide", "",
            "A pyramidal TIFF built from BCCD fields with known white cells "
            "(`benchmarks/wholeslide.py`), analysed by `pipeline.wholeslide."
            "analyze_whole_slide` in its own process (shipped models, onnxruntime), then "
            "the same fields analysed one by one by the same Analyzer for reference. Time "
            "per megapixel of smear: the slide's analysis time over the pasted fields' "
            "area; the windows overlap, so each smear pixel is read more than once.", ""]
    out += wholeslide(rows)
    return out

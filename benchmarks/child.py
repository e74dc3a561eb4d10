"""One measuring subprocess: `python -m benchmarks.child '<json spec>'`.

Runs the system the spec names, then prints one line `BENCH-RESULT {json}`
with its metrics, peak RSS and whether torch was loaded, or status "skipped"
(with the reason) when the system cannot run here. A fresh process per system
is what makes the peak RSS that system's own.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable

from benchmarks.common import RESULT_MARK, NetworkGuard, Skip, peak_rss_mb


def _kinds() -> dict[str, Callable[[dict], dict]]:
    from benchmarks import peers_onnx, scaling, slides, systems, training, wholeslide

    return {"pipeline": systems.pipeline, "torchvision": systems.torchvision_peer,
            "yolo": systems.yolo_peer, "level2": systems.level2,
            "profile_torch": systems.profile_torch, "profile_onnx": systems.profile_onnx,
            "scaling": scaling.scaling, "training": training.training,
            "onnx_export": peers_onnx.export, "torchvision_onnx": peers_onnx.torchvision_onnx,
            "yolo_onnx": peers_onnx.yolo_onnx, "slides_workers": slides.workers,
            "slides_memory": slides.memory, "wsi_build": wholeslide.build,
            "wsi": wholeslide.analyze}


def main(argv: list[str]) -> int:
    started = time.perf_counter()
    spec = json.loads(argv[0])
    guard = NetworkGuard().install()
    out: dict = {"status": "ok"}
    try:
        out["metrics"] = _kinds()[spec["kind"]](spec)
    except Skip as reason:
        out = {"status": "skipped", "reason": str(reason)}
    except Exception as error:  # reported as a failed row; the run goes on
        traceback.print_exc()
        out = {"status": "failed", "reason": f"{type(error).__name__}: {error}"}
    out.update(peak_rss_mb=peak_rss_mb(), torch_loaded="torch" in sys.modules,
               network_attempts=guard.attempts, child_wall_s=time.perf_counter() - started)
    print(RESULT_MARK + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`analyze --slides --engine ray`: the slide job of `reports.slides` on Ray, so a run
scales past one machine without a scheduler of our own.

Ray Data streams every field of the run through `map_batches` over an actor pool: each
actor holds one Analyzer of one thread (one CPU), analyses a field and writes its PNG,
JSON, GeoJSON and cell thumbnails into the slide's folder, and sends back only the
field's cells. With `preserve_order` the fields come back in the order they went in, and
this process commits them exactly as the local engine does (`_SlideState`): the same
files, the same numbers. With `--target`, when a slide reaches it (or fails) a small
actor (`_Stops`) tells the pool to skip that slide's remaining fields; fields analysed
ahead are removed (as the local engine does).

Paths: actors read the images and write the slide folders themselves, so the inputs and
`--out` must be paths every node can open (one machine, or a shared filesystem mounted
alike everywhere); relative paths are taken from this process's folder.

Ray is optional (the `ray` extra) and imported here only, when the engine runs.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from leukodiff.reports.slides import (
    FINISHED,
    SLIDES,
    AnalyzerSpec,
    Slide,
    SlideProgress,
    SlidesInterrupted,
    SlidesRun,
    _analyze_field,
    _claim,
    _cut_short,
    _field_stem,
    _FieldOutcome,
    _FieldTask,
    _SlideState,
    write_summary,
)

FIELDS_PER_BLOCK = 16  # Ray Data's unit of scheduling (`_stream`)
CONNECT_TIMEOUT_S = 10.0  # reaching a cluster's head: Ray itself waits on, unbounded
HEAD_CHECK_EVERY_S = 2.0


def _head_lost_after_s() -> float:
    """Ray ends the whole process (no exception to catch) once its head has been gone
    `gcs_rpc_server_reconnect_timeout_s` (60 s; RAY_gcs_rpc_server_reconnect_timeout_s):
    the head watch gives up 10 s before, so the summary is written and the message is
    ours, and a head that comes back in time (GCS fault tolerance) loses nothing."""
    try:
        limit = float(os.environ.get("RAY_gcs_rpc_server_reconnect_timeout_s", "60"))  # noqa: SIM112
    except ValueError:
        limit = 60.0
    return max(2 * HEAD_CHECK_EVERY_S, limit - 10)


class RayEngineError(RuntimeError):
    """Ray is missing, the cluster cannot be reached, or it failed during the run."""


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise RayEngineError("--engine ray needs Ray: pip install 'leukodiff[ray]'") from None
    return ray


def _probe(address: str) -> None:
    """Fail fast on an address nothing answers at: `ray.init` would retry for minutes."""
    if address == "auto":
        return
    match = re.fullmatch(r"\[?([^\]/]+?)\]?:(\d+)", address.strip())
    if match is None:
        raise RayEngineError(f"--address {address!r}: give the cluster's head as HOST:PORT "
                             "(its GCS port, 6379 by default), or auto (the cluster this "
                             "machine belongs to, e.g. under `ray job submit`)")
    host, port = match[1], int(match[2])
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise RayEngineError(f"cannot reach the Ray cluster at {address} ({reason}); is its "
                             "head running (`ray start --head` / `ray up`) and the port open "
                             "from here? Nothing was analysed.") from None


def check_ray(address: str | None) -> None:
    """Before anything is written: Ray importable, and the cluster's head answering."""
    _import_ray()
    if address is not None:
        _probe(address)


def _connect(ray: Any, address: str | None, workers: int | None) -> bool:
    """Join the cluster at `address`, or start a local one of `workers` CPUs; True when
    this run started Ray (and so shuts it down). A Ray already initialised is used."""
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address is None:
        ray.init(num_cpus=workers, include_dashboard=False, **quiet)
        return True
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise RayEngineError(f"cannot join the Ray cluster at {address}: {error}") from None
    return True


class _Stops:
    """Which slides are closed (target reached or failed): their remaining fields are
    skipped by the actors (a Ray actor; its methods run one at a time)."""

    def __init__(self) -> None:
        self.closed: set[str] = set()

    def close(self, folder: str) -> None:
        self.closed.add(folder)

    def is_closed(self, folder: str) -> bool:
        return folder in self.closed


def _field_actor(spec: AnalyzerSpec, stops: Any) -> type:
    """The pool's actor class, `spec` and `stops` held by the class (not constructor
    arguments, which Ray Data would keep in the object store)."""

    class FieldActor:
        """One actor of the pool: one Analyzer, one thread, for the whole run."""

        def __init__(self) -> None:
            self.analyzer = spec.load(threads=1)

        def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
            return _analyze_batch(self.analyzer, stops, batch)

    return FieldActor


def _analyze_batch(analyzer: Any, stops: Any, batch: dict[str, Any]) -> dict[str, list]:
    """In an actor: each field of the batch analysed and its files written (the slide's
    folder made if this is its first), unless its slide is closed; the outcomes pickled."""
    import ray

    outcomes = []
    for folder, stem, path, name in zip(batch["folder"], batch["stem"], batch["path"],
                                        batch["name"], strict=True):
        if stops is not None and ray.get(stops.is_closed.remote(str(folder))):
            outcomes.append(pickle.dumps(None))
            continue
        task = _FieldTask(str(folder), str(stem), str(path), str(name))
        try:
            for part in ("fields", "cells"):
                (Path(task.folder) / part).mkdir(parents=True, exist_ok=True)
            outcome: Any = _analyze_field(analyzer, task)
        except Exception as error:  # a bug or a full disk: that slide fails
            outcome = f"{type(error).__name__}: {error}"
        outcomes.append(pickle.dumps(outcome))
    return {"seq": list(batch["seq"]), "outcome": outcomes}


def analyze_on_ray(slides: Sequence[Slide], out_dir: Path, spec: AnalyzerSpec,
                   run: SlidesRun, models: dict[str, str], *, workers: int | None,
                   address: str | None, target: int | None, resume: bool, parquet: bool,
                   progress: SlideProgress, log: Callable[[str], None]) -> SlidesRun:
    """`analyze_slides(engine="ray")` once its checks are done: see the module."""
    ray = _import_ray()
    owned = _connect(ray, address, workers)
    rows: dict[int, dict] = {}
    states: dict[int, _SlideState] = {}
    busy = threading.Lock()  # held while a field is taken: the head watch waits for it

    def cluster_lost(where: str) -> None:
        """The head is gone (Ray would end this process within a minute, with no
        exception to catch): the summary written and said why, then exit."""
        with busy:
            finished = sum(row.get("status") in FINISHED for row in rows.values())
            _cut_short(run, slides, rows, states, out_dir,
                       f"the Ray cluster failed (its head at {where} stopped answering); "
                       "rerun with --resume")
            log(f"error: the Ray cluster failed during the run: its head at {where} stopped "
                f"answering. {finished} slide(s) finished and kept; the run's state is in "
                f"{out_dir / 'summary.csv'}: rerun with --resume to go on.")
            os._exit(1)

    watch = _HeadWatch(ray.get_runtime_context().gcs_address, cluster_lost)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        size = workers or max(1, cpus)
        if size > cpus:
            log(f"note: {size} actors asked for, the Ray cluster has {cpus} CPU(s): the "
                "pool waits for the rest (an autoscaling cluster adds nodes)")
        run.notes.append(f"engine: Ray, {size} actor(s) of one Analyzer x 1 thread"
                         + (f" on the cluster at {address}" if address else " (local)"))
        progress.run_started(len(slides))
        plan: list[tuple[int, Slide, str]] = []
        for number, slide in enumerate(slides):  # all folders cleared before any actor
            row, note = _claim(slide, out_dir, resume)
            if row is None:
                plan.append((number, slide, note))
            else:
                rows[number] = row
                progress.slide_finished(slide, row)
        tasks: list[tuple[int, int, _FieldTask]] = []
        for number, slide, _ in plan:
            folder = out_dir / SLIDES / slide.folder_name
            tasks += [(number, index, _FieldTask(str(folder), _field_stem(index, path),
                                                 str(path)))
                      for index, path in enumerate(slide.fields, start=1)]
        notes = {number: note for number, _, note in plan}
        if tasks:
            # without a target only a failing slide closes early (rare): no call per field
            stops = ray.remote(num_cpus=0)(_Stops).remote() if target else None
            for seq, outcome in _stream(ray, spec, stops, tasks, size):
                with busy:
                    number, index, task = tasks[seq]
                    slide = slides[number]
                    if (state := states.get(number)) is None:
                        progress.slide_started(slide)
                        state = states[number] = _SlideState(slide, Path(task.folder), target,
                                                             parquet, notes[number])
                    _take(state, index, task, outcome, progress, stops, log)
                    if index == len(slide.fields):
                        del states[number]
                        rows[number] = state.finish(models)
                        progress.slide_finished(slide, rows[number])
    except KeyboardInterrupt:
        _cut_short(run, slides, rows, states, out_dir)
        raise SlidesInterrupted(run) from None
    except ray.exceptions.RayError as error:  # e.g. every actor lost, retries spent
        finished = sum(row.get("status") in FINISHED for row in rows.values())
        failure = f"{type(error).__name__}: {_first_line(error)}"
        _cut_short(run, slides, rows, states, out_dir, f"the Ray cluster failed ({failure}); "
                   "rerun with --resume")
        raise RayEngineError(
            f"the Ray cluster failed during the run ({failure}); {finished} slide(s) "
            f"finished and kept, the run's state in {out_dir / 'summary.csv'}: rerun with "
            "--resume to go on") from None
    finally:
        watch.stop()
        if owned:
            ray.shutdown()
    run.rows = [rows[n] for n in sorted(rows)]
    write_summary(out_dir, run)
    return run


def _stream(ray: Any, spec: AnalyzerSpec, stops: Any,
            tasks: list[tuple[int, int, _FieldTask]], size: int):
    """(task number, outcome) for every task, in task order, as the actors finish them.
    Blocks of FIELDS_PER_BLOCK fields (at least 4 blocks an actor, so a short run still
    spreads over the pool): a block per field cost Ray Data a task each (400 fields, 2
    actors: 46 s; 8 a block 39 s, 32 a block 37 s; the process pool 27 s)."""
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # no INFO lines per dataset
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    items = [{"seq": seq, "folder": str(Path(task.folder).absolute()), "stem": task.stem,
              "path": str(Path(task.path).absolute()), "name": task.path}
             for seq, (_, _, task) in enumerate(tasks)]
    blocks = max(min(len(items), 4 * size), len(items) // FIELDS_PER_BLOCK)
    fields = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        _field_actor(spec, stops), batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=size), num_cpus=1)
    for row in fields.iter_rows():
        yield int(row["seq"]), pickle.loads(row["outcome"])


def _take(state: _SlideState, index: int, task: _FieldTask, outcome: Any,
          progress: SlideProgress, stops: Any, log: Callable[[str], None]) -> None:
    """A field's outcome, in field order, as the local engine takes it."""
    if state.stopped:  # analysed ahead, or skipped by the actor: not counted
        if outcome is not None:
            state.discard(task)
        return
    if isinstance(outcome, str):  # the actor raised: this slide fails, the run goes on
        state.error = f"{Path(task.path).name}: {outcome}"
        state.stopped = True
        log(f"slide {state.slide.slide_id}: {state.error}")
    elif isinstance(outcome, _FieldOutcome):
        state.commit(index, task, outcome)
        progress.field_done(state.slide)
    if state.stopped and stops is not None:
        stops.close.remote(str(Path(task.folder).absolute()))


class _HeadWatch:
    """Checks the cluster's head (its GCS port) every HEAD_CHECK_EVERY_S while the run
    goes on; once it has not answered for `_head_lost_after_s()`, calls `lost(address)`."""

    def __init__(self, gcs_address: str, lost: Callable[[str], None]) -> None:
        self.address, self.lost = gcs_address, lost
        host, _, port = gcs_address.rpartition(":")
        self.where = (host.strip("[]"), int(port))
        self.done = threading.Event()
        threading.Thread(target=self._watch, name="ray-head-watch", daemon=True).start()

    def stop(self) -> None:
        self.done.set()

    def _answers(self) -> bool:
        try:
            socket.create_connection(self.where, timeout=HEAD_CHECK_EVERY_S).close()
        except OSError:
            return False
        return True

    def _watch(self) -> None:
        silent, limit = 0.0, _head_lost_after_s()
        while not self.done.wait(HEAD_CHECK_EVERY_S):
            silent = 0.0 if self._answers() else silent + HEAD_CHECK_EVERY_S
            if silent >= limit and not self.done.is_set():
                self.lost(self.address)
                return


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""

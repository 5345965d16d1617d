"""The Gradio page and API of the web app: ``python -m app.web`` (see ``main``).

The page (:mod:`app.web.page`): an image column (upload or example, model, working size,
Segment, Refine, Back to the segmentation, Undo, Cancel, status) and tabs for the result
(overlay and class legend), the uncertainty map, the before/after slider, the correction editor
(save to the annotation store) and fine-tuning. Labels are offered for download as TIFF and
palette PNG.

API (``gradio_client``): named endpoints ``/segment``, ``/refine``, ``/save``, ``/undo``,
``/finetune``, ``/cancel`` and ``/models`` take files and plain values, no session state; the
page's own events are private. Every endpoint and button calls the same
:class:`~app.web.session.Workbench`, whose jobs are ``app.workbench``'s (napari runs the same).

All model work shares one concurrency group (``--concurrency``, default 1), so however many
people use the page, at most that many jobs hold memory at once; the rest wait in a queue of at
most ``--queue-size`` (20) requests, and requests beyond that are refused at once ("Queue is
full", HTTP 503 from ``/queue/join`` and ``/call/<name>``; ``gradio_client`` raises
``QueueError``). No route gets around it: ``/run/<name>`` refuses queued functions (HTTP 404,
"join the queue"), and every model function also holds a place of one
:class:`~app.web.limits.JobGate` of the same size, with a memory reservation the memory guard
of the other running jobs plans with. Uploads are capped per request (files and bytes) and
fine-tuning per request (steps and minutes): see :mod:`app.web.limits` and ``--help``.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from app.workbench import FinetuneCancelled
from engine.errors import Cancelled, FineMaskError
from engine.installed import default_refiner
from engine.io import DEFAULT_MAX_PIXELS
from engine.memory import release_freed_memory
from engine.refine_modes import DEFAULT_MODE

from .limits import (
    JobGate,
    RequestLimits,
    UploadLimit,
    finetune_budget,
    parse_size,
    upload_bytes_cap,
)
from .page import ENGINE, IO, SWATCH_NAMES_JS, UPLOAD_TYPES, build_page, reporter  # noqa: F401 - IO, UPLOAD_TYPES re-exported
from .render import overlay_view, uncertainty_view
from .session import WebConfig, Work, Workbench

log = logging.getLogger("finemask.web")
API_FILE_MAX_AGE_S = 3600


# --------------------------------------------------------------------------------------------
# Glue between engine callbacks and Gradio


class CancelFlags:
    """One cancel flag per browser session (or API client); a job clears it when it starts."""

    def __init__(self) -> None:
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str | None) -> Callable[[], bool]:
        flag = threading.Event()
        with self._lock:
            self._flags[session or ""] = flag
        return flag.is_set

    def cancel(self, session: str | None) -> bool:
        with self._lock:
            flag = self._flags.get(session or "")
        if flag is None or flag.is_set():
            return False
        flag.set()
        return True


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or ""


def user_errors(fn: Callable) -> Callable:
    """Turn every failure of an API function into an error the client gets (the server keeps running).

    FineMaskError (bad file, unknown model, ...) shows its text, which names the file;
    cancellation says so; anything else is logged with its traceback and summarised.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except FineMaskError as exc:
            raise gr.Error(str(exc), title="FineMask", print_exception=False) from None
        except Cancelled:
            raise gr.Error("Cancelled.", title="Cancelled", print_exception=False) from None
        except MemoryError:
            raise gr.Error("Not enough memory for this image: try a smaller working size or image.",
                           title="Out of memory", print_exception=False) from None
        except Exception as exc:  # a bug: keep the server up and say what happened
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(f"Unexpected error ({type(exc).__name__}: {exc}). The server log has the details.",
                           print_exception=False) from None
        finally:
            release_freed_memory()

    return wrapper


# --------------------------------------------------------------------------------------------
# The page


def build_app(config: WebConfig | None = None, *, model: str | Path | None = None,
              refiner: str | Path | None = None, store: Any = None,
              workbench: Workbench | None = None, limits: RequestLimits | None = None) -> gr.Blocks:
    """Build the page. ``model``/``refiner``/``store`` override the config (tests pass tiny models).

    The returned Blocks carries the :class:`Workbench` as ``.finemask``; start it with :func:`launch`.
    """
    bench = workbench or Workbench(config, model=model, refiner=refiner, store=store)
    cfg = bench.config
    flags = CancelFlags()
    limits = limits or RequestLimits()
    gate = JobGate(cfg.concurrency, cfg.queue_size,
                   refuse=lambda text: gr.Error(text, title="Queue is full", print_exception=False))

    def budget(steps: float | None, minutes: float | None) -> tuple[int, float]:
        """(steps, minutes) of one fine-tuning request within the server's caps (0 steps: the default)."""
        return finetune_budget(int(steps) if steps else None, minutes, limits, cfg.finetune.steps)
    # ---------------------------------------------------------------- handlers of the API

    def api_work(image: str, name_hint: str | None = None) -> Work:
        _sweep(bench.outdir, API_FILE_MAX_AGE_S)
        if not image:
            raise FineMaskError("no image given")
        return bench.open_image(image)

    def api_outputs(work: Work) -> tuple:
        files = bench.export(work)
        tif = str(files[0]) if files else None
        png = str(files[1]) if len(files) > 1 else None
        shown = overlay_view(work.image, work.labels, work.palette, cfg.display_max_side)
        unc = None if work.uncertainty is None else uncertainty_view(work.uncertainty, cfg.display_max_side)
        return shown, tif, png, unc, work.summary()

    @user_errors
    def api_segment(image: str, model: str, working_size: float, request: gr.Request,
                    progress: gr.Progress = gr.Progress()):
        """Segment an image file. Returns overlay, labels TIFF, labels PNG, uncertainty map, info."""
        work = api_work(image)
        bench.segment(work, model or None, int(working_size) if working_size else None, reporter(progress),
                      flags.start(_session(request)))
        return api_outputs(work)

    @user_errors
    def api_refine(image: str, labels: str, mode: str, refiner: str, model: str, request: gr.Request,
                   progress: gr.Progress = gr.Progress()):
        """Refine a label file at full resolution. Returns overlay, labels TIFF, labels PNG, confidence map, info."""
        work = api_work(image)
        if not labels:
            raise FineMaskError("no labels given")
        bench.set_labels(work, labels, model or None)
        work.origin = "predicted"
        bench.refine(work, refiner or None, mode or DEFAULT_MODE, reporter(progress), flags.start(_session(request)))
        return api_outputs(work)

    @user_errors
    def api_save(image: str, labels: str, model: str, origin: str):
        """Save an image and its (corrected) labels to the annotation store. Returns the pair's record."""
        work = api_work(image)
        if not labels:
            raise FineMaskError("no labels given")
        bench.set_labels(work, labels, model or None)
        work.origin = origin or "corrected"
        record = bench.save(work)
        return {"pair_id": record.id, "split": record.split, "origin": record.origin, "classes": list(record.classes),
                "store": str(bench.store.root), "pairs": len(bench.store.pairs())}

    @user_errors
    def api_finetune(base: str, steps: float, minutes: float, request: gr.Request,
                     progress: gr.Progress = gr.Progress()):
        """Fine-tune a model on the store. Returns the new version's name and before/after scores."""
        started = time.perf_counter()
        try:
            result = bench.finetune(base or None, *budget(steps, minutes),
                                    reporter(progress), flags.start(_session(request)))
        except FinetuneCancelled as exc:  # the API's answer for a cancelled run (no version written)
            return {"name": None, "finished": False, "steps": exc.steps, "before": exc.before, "after": {},
                    "seconds": round(time.perf_counter() - started, 1)}
        return {"name": result.name, "finished": result.finished, "steps": result.steps,
                "before": result.before, "after": result.after, "seconds": round(result.seconds, 1)}

    @user_errors
    def api_undo(pair_id: str, request: gr.Request, progress: gr.Progress = gr.Progress()):
        """Undo the last save of a store pair (the id /save returned). Returns the pair's record."""
        if not pair_id:
            raise FineMaskError("no pair id given: use the pair_id that /save returned")
        record = bench.undo_pair(pair_id, reporter(progress), flags.start(_session(request)))
        return {"pair_id": record.id, "split": record.split, "origin": record.origin,
                "versions_left": record.history_length, "store": str(bench.store.root)}

    def api_cancel(request: gr.Request):
        """Cancel this client's running job at its next step."""
        return {"cancelled": flags.cancel(_session(request))}

    def api_models():
        """Models on offer and the defaults."""
        return {"segmentation": [k for _, k in bench.model_choices("segmentation")],
                "refinement": [k for _, k in bench.model_choices("refinement")],
                "default_model": bench.default_model, "default_refiner": bench.default_refiner,
                "refiner_problem": bench.refiner_problem}

    # ---------------------------------------------------------------- layout
    with gr.Blocks(title="FineMask", delete_cache=(1800, 7200)) as demo:
        demo.finemask_page = build_page(  # type: ignore[attr-defined]
            bench, served_examples(cfg.examples, warn=True), flags, budget, limits.max_finetune_steps,
            limits.max_finetune_minutes)

        # API-only endpoints: hidden components give them typed, named parameters.
        with gr.Group(visible=False):
            a_image = gr.File(label="image", file_types=UPLOAD_TYPES, type="filepath")
            a_labels = gr.File(label="labels", file_types=[".tif", ".tiff", ".png"], type="filepath")
            a_model = gr.Textbox("", label="model")
            a_refiner = gr.Textbox("", label="refiner")
            a_mode = gr.Textbox(DEFAULT_MODE, label="mode")
            a_origin = gr.Textbox("corrected", label="origin")
            a_pair = gr.Textbox("", label="pair_id")
            a_size = gr.Number(0, label="working_size")
            a_steps = gr.Number(0, label="steps")
            a_minutes = gr.Number(0, label="minutes")
            a_overlay = gr.Image(label="overlay", type="numpy", format="jpeg")
            a_tif = gr.File(label="labels_tif")
            a_png = gr.File(label="labels_png")
            a_map = gr.Image(label="uncertainty", type="numpy", format="jpeg")
            a_info = gr.JSON(label="info")
            a_button = gr.Button()
        api = dict(concurrency_id=ENGINE, api_visibility="public")
        results = [a_overlay, a_tif, a_png, a_map, a_info]
        a_button.click(api_segment, [a_image, a_model, a_size], results, api_name="segment", **api)
        a_button.click(api_refine, [a_image, a_labels, a_mode, a_refiner, a_model], results, api_name="refine", **api)
        a_button.click(api_save, [a_image, a_labels, a_model, a_origin], a_info, api_name="save", **api)
        a_button.click(api_finetune, [a_model, a_steps, a_minutes], a_info, api_name="finetune", **api)
        a_button.click(api_undo, [a_pair], a_info, api_name="undo", **api)
        a_button.click(api_cancel, None, a_info, api_name="cancel", queue=False)
        a_button.click(api_models, None, a_info, api_name="models", queue=False)

    # Every model job holds a place of the gate, whatever route reached it (see app.web.limits).
    for block_fn in demo.fns.values():
        if block_fn.concurrency_id == ENGINE:
            block_fn.fn = gate.guard(block_fn.fn)
    demo.finemask = bench  # type: ignore[attr-defined]
    demo.finemask_gate = gate  # type: ignore[attr-defined]
    demo.finemask_limits = limits  # type: ignore[attr-defined]
    return demo


def served_examples(paths: list[Path], *, warn: bool = False) -> list[Path]:
    """The example images that may be shown and served: regular files that really lie in the
    folder they are listed in.

    A symlink that leads out of its folder is left out: Gradio would copy its target into its
    cache (served to anyone) and the target's folder would otherwise become an allowed path.
    """
    kept = []
    for p in map(Path, paths):
        try:
            real, folder = p.resolve(strict=True), p.parent.resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a symlink loop
            continue
        if real.is_file() and real.is_relative_to(folder):
            kept.append(p)
        elif warn:
            log.warning("example %s is not a file inside %s: not offered", p, folder)
    return kept


def _sweep(folder: Path, max_age_s: float) -> None:
    """Remove per-call output folders older than ``max_age_s`` (API calls leave one each)."""
    now = time.time()
    for sub in folder.iterdir() if folder.is_dir() else []:
        try:
            if sub.is_dir() and now - sub.stat().st_mtime > max_age_s:
                shutil.rmtree(sub, ignore_errors=True)
        except OSError:
            continue


# --------------------------------------------------------------------------------------------
# Serving


def launch(demo: gr.Blocks, *, block: bool = True) -> str:
    """Start the server with the Workbench's settings; print and return the local address.

    Only the examples' folder is served besides Gradio's own upload and cache folders (Gradio
    resolves symlinks, so a link in that folder to a file outside it is refused); the annotation
    store is blocked explicitly. With ``block`` False return at once (tests).
    """
    bench: Workbench = demo.finemask  # type: ignore[attr-defined]
    cfg = bench.config
    limits: RequestLimits = getattr(demo, "finemask_limits", None) or RequestLimits()
    # api_open=False: POST /run/<name> (and /api/<name>) may not call a queued function directly;
    # model work only enters through the queue (/queue/join, /call/<name>) and its concurrency group.
    demo.queue(default_concurrency_limit=max(1, cfg.concurrency), max_size=max(1, cfg.queue_size), api_open=False)
    upload_cap = upload_bytes_cap(limits, parse_size(cfg.max_file_size))
    # The folder an example is listed in, not its target's: a symlinked example must not open up
    # the folder it points into.
    allowed = sorted({str(p.parent.resolve()) for p in served_examples(cfg.examples)})
    _, url, share_url = demo.launch(
        server_name=cfg.host, server_port=cfg.port, share=cfg.share, auth=cfg.auth,
        max_file_size=cfg.max_file_size, allowed_paths=allowed, blocked_paths=[str(bench.store.root.resolve())],
        prevent_thread_lock=True, quiet=True, show_error=True, ssr_mode=False, footer_links=["api", "settings"],
        head=SWATCH_NAMES_JS,
        app_kwargs={"middleware": [Middleware(UploadLimit, max_files=limits.max_upload_files, max_bytes=upload_cap)]},
    )
    print(f"FineMask web app running on {url}" + (f" (public link: {share_url})" if share_url else ""), flush=True)
    print(f"annotation store: {bench.store.root}", flush=True)
    if bench.refiner_problem:
        print(f"note: {bench.refiner_problem}", flush=True)
    if block:
        try:
            demo.block_thread()
        finally:
            bench.close()
    return url


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app.web", description="FineMask in the browser: segment, refine, "
                                "correct and fine-tune on this machine.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true",
                   help="also open a temporary public gradio.live link (needs internet)")
    p.add_argument("--auth", metavar="USER:PASSWORD", default=os.environ.get("FINEMASK_WEB_AUTH"),
                   help="require this login (or set $FINEMASK_WEB_AUTH, which other users cannot see in ps)")
    p.add_argument("--store", type=Path, default=None,
                   help="annotation store folder (default: in the user data folder)")
    p.add_argument("--model", default="camvid", help="default segmentation model: shipped name or folder (camvid)")
    p.add_argument("--refiner", default=default_refiner(), help="default refiner (cascadepsp if installed)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help=f"largest image in pixels (default $FINEMASK_MAX_PIXELS or {DEFAULT_MAX_PIXELS:,} = "
                        "16384x16384, the limit of every FineMask front end)")
    p.add_argument("--max-file-size", default="500mb", help="largest upload, e.g. 500mb (default)")
    p.add_argument("--concurrency", type=int, default=1, help="model jobs running at once over all users (1)")
    p.add_argument("--queue-size", type=int, default=20,
                   help="requests waiting for a job slot (20); more are refused at once with 'Queue is full'")
    p.add_argument("--max-upload-files", type=int, default=RequestLimits.max_upload_files,
                   help=f"files in one upload request ({RequestLimits.max_upload_files}); more are refused (HTTP 413)")
    p.add_argument("--max-upload-bytes", default=None,
                   help="bytes in one upload request, e.g. 600mb (default: --max-file-size + 32mb); more are refused")
    p.add_argument("--max-finetune-steps", type=int, default=RequestLimits.max_finetune_steps,
                   help=f"most steps one fine-tuning request may ask for ({RequestLimits.max_finetune_steps})")
    p.add_argument("--max-finetune-minutes", type=float, default=RequestLimits.max_finetune_minutes,
                   help="longest one fine-tuning request may run, in minutes "
                        f"({RequestLimits.max_finetune_minutes:g}); "
                        "also the budget of a request that gives none")
    p.add_argument("--editor-size", type=int, default=1280,
                   help="longest side of the image in the correction editor; larger images are edited on a preview")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> WebConfig:
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise FineMaskError("--auth must look like user:password")
        auth = (user, password)
    cfg = WebConfig(host=args.host, port=args.port, share=args.share, auth=auth, model=args.model,
                    refiner=args.refiner, max_pixels=args.max_pixels, max_file_size=args.max_file_size,
                    concurrency=max(1, args.concurrency), queue_size=max(1, args.queue_size),
                    editor_max_side=args.editor_size, device=args.device)
    if args.store is not None:
        cfg.store = args.store
    return cfg


def limits_from_args(args: argparse.Namespace) -> RequestLimits:
    """The per-request caps of the command line; a FineMaskError names a bad one."""
    for name in ("max_upload_files", "max_finetune_steps", "max_finetune_minutes"):
        if getattr(args, name) <= 0:
            raise FineMaskError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return RequestLimits(max_upload_files=args.max_upload_files, max_upload_bytes=parse_size(args.max_upload_bytes),
                         max_finetune_steps=args.max_finetune_steps, max_finetune_minutes=args.max_finetune_minutes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        limits = limits_from_args(args)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print("loading models…", flush=True)
        demo = build_app(cfg, limits=limits)
    except FineMaskError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Stop cleanly on SIGTERM too (service managers, `kill`), so the download folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        launch(demo, block=True)
    except KeyboardInterrupt:
        pass
    return 0


__all__ = ["CancelFlags", "build_app", "config_from_args", "launch", "limits_from_args", "main", "parse_args",
           "release_freed_memory", "served_examples", "user_errors"]

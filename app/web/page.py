"""The page of the web app: its layout, and the handlers behind its buttons.

Every handler returns a dict of the outputs it changes, so a job that fails or is cancelled
changes nothing but the status line: the last good overlay, legend, editor and downloads stay
(a cancel is reported as information, a problem as a warning, never as an error over every
output). Progress is shown once, on the status line, and the results stay visible while a job
runs. The jobs are :class:`~app.web.session.Workbench`'s; this module converts values and
writes messages.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from app.workbench import FinetuneCancelled
from app.workbench.samples import Sample, sample_for
from engine.errors import Cancelled, FineMaskError
from engine.memory import release_freed_memory
from engine.refine_modes import DEFAULT_MODE, MODE_HELP, REFINE_MODES

from .editor import BRUSH_OPACITY, css_colour
from .render import legend_html, metrics_markdown, overlay_view, uncertainty_view
from .session import SEGMENTER_UNCERTAINTY, WORKING_SIZE_RANGE, Work, Workbench

log = logging.getLogger("finemask.web")
ENGINE = "engine"  # concurrency group of all model work
IO = "io"  # concurrency group of reading uploads
UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".tif", ".tiff"]

HELP = """# FineMask
Segment an image, refine the mask at full resolution, correct it with the brush, save it to
the annotation store, and fine-tune the model on your corrections. Everything runs on this
machine; nothing is sent anywhere."""

CORRECT_HELP = ("Pick a class colour (its name shows on the swatch; the legend below lists them in the same "
                "order), paint over the image, remove paint with the eraser, then **Apply** to see the result "
                "or **Save** to store it. Images larger than the editor are edited on a preview; at full "
                "resolution the outline of each stroke is snapped to the image's edges within a few preview "
                "pixels.")

#: Names the editor's colour swatches after the classes: the editor legend lists each class's
#: brush colour (``data-brush``) and name, and every swatch of that colour gets the name as its
#: tooltip and accessible label.
SWATCH_NAMES_JS = """
<script>
(() => {
  const norm = c => (c || "").replace(/\\s+/g, "");
  const name = () => {
    const names = {};
    document.querySelectorAll("#editor-legend [data-brush]")
        .forEach(e => { names[norm(e.dataset.brush)] = e.dataset.name; });
    document.querySelectorAll("#editor menu.swatch button").forEach(b => {
      const n = names[norm(b.style.backgroundColor)];
      if (n && b.title !== n) { b.title = n; b.setAttribute("aria-label", n); }
    });
  };
  new MutationObserver(name).observe(document.documentElement, {childList: true, subtree: true});
})();
</script>
"""


def reporter(progress: gr.Progress) -> Callable[[int, int, str], None]:
    """An engine ``on_progress`` that moves the page's progress bar."""
    def report(done: int, total: int, message: str) -> None:
        progress((int(done), max(int(total), 1)), desc=message)

    return report


def refine_choices() -> list[tuple[str, str]]:
    """(label, mode) of the refinement modes, each with its one-line description."""
    return [(f"{mode}: {MODE_HELP[mode]}" if mode in MODE_HELP else mode, mode) for mode in REFINE_MODES]


def example_rows(bench: Workbench, paths: list[Path]) -> tuple[list[list[str]], list[str]]:
    """Examples as (image, model) rows and their labels: a bundled sample names the model it is
    for (the default model when that one is not on offer)."""
    offered = {key for _, key in bench.model_choices("segmentation")}
    rows, labels = [], []
    for path in paths:
        sample: Sample | None = sample_for(path)
        model = sample.model if sample is not None and sample.model in offered else bench.default_model
        rows.append([str(path), model])
        labels.append(sample.label if sample is not None else f"{path.name} · {model}")
    return rows, labels


def build_page(bench: Workbench, examples: list[Path], cancel_flags: Any, budget: Callable,
               max_steps: int, max_minutes: float) -> dict[str, Any]:
    """Lay out the page inside the current ``gr.Blocks`` and wire its events; returns the
    components by name (tests and the API part use some)."""
    cfg = bench.config

    def all_choices() -> list[tuple[str, str]]:
        return [(f"{label} · {task}", key) for task in ("segmentation", "refinement")
                for label, key in bench.model_choices(task)]

    # ---------------------------------------------------------------- layout
    work_state = gr.State(None, delete_callback=_forget)
    gr.Markdown(HELP)
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            image_file = gr.File(label="Image (PNG, JPEG, TIFF incl. 16-bit)", file_types=UPLOAD_TYPES,
                                 type="filepath", elem_id="image-file")
            model_dd = gr.Dropdown(bench.model_choices("segmentation"), value=bench.default_model,
                                   label="Segmentation model", elem_id="model")
            if examples:
                rows, labels = example_rows(bench, examples)
                gr.Examples(examples=rows, inputs=[image_file, model_dd], example_labels=labels,
                            label="Examples (each picks the model it is for)", elem_id="examples")
                about = [f"*{sample.path.name}*: {sample.about}" for sample in map(sample_for, examples)
                         if sample is not None and sample.about]
                if about:
                    gr.Markdown("\n".join(f"- {line}" for line in about), elem_id="examples-about")
            size = gr.Slider(*WORKING_SIZE_RANGE, step=16, value=bench.model_working_size(bench.default_model),
                             label="Working size (longer side, px)", elem_id="working-size")
            segment_btn = gr.Button("Segment", variant="primary", elem_id="segment-btn")
            refiner_dd = gr.Dropdown(bench.model_choices("refinement"), value=bench.default_refiner,
                                     label="Refinement model", elem_id="refiner", allow_custom_value=False)
            mode = gr.Radio(refine_choices(), value=DEFAULT_MODE, label="Refinement mode", elem_id="mode")
            refine_btn = gr.Button("Refine", elem_id="refine-btn")
            with gr.Row():
                back_btn = gr.Button("Back to the segmentation", size="sm", elem_id="back-btn")
                undo_change_btn = gr.Button("Undo last change", size="sm", elem_id="undo-change-btn")
            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn")
            status = gr.Markdown(bench.store_summary, elem_id="status")  # a function: filled on every page load
            if bench.refiner_problem:
                gr.Markdown(f"*{bench.refiner_problem}*", elem_id="refiner-problem")
        with gr.Column(scale=2):
            with gr.Tabs():
                with gr.Tab("Result", id="result"):
                    overlay_img = gr.Image(label="Segmentation overlay", type="numpy", interactive=False,
                                           format="jpeg", elem_id="overlay")
                    legend = gr.HTML(elem_id="legend")
                with gr.Tab("Uncertainty", id="uncertainty"):
                    uncertainty_img = gr.Image(label=SEGMENTER_UNCERTAINTY, type="numpy", interactive=False,
                                               format="jpeg", elem_id="uncertainty")
                with gr.Tab("Before / after", id="compare"):
                    slider = gr.ImageSlider(label="Before / after the last change", type="numpy", format="jpeg",
                                            elem_id="compare")
                with gr.Tab("Correct", id="correct"):
                    gr.Markdown(CORRECT_HELP)
                    side = cfg.editor_max_side
                    editor = gr.ImageEditor(label="Correction", type="numpy", image_mode="RGBA", sources=(),
                                            transforms=(), brush=_brush(bench, None), eraser=gr.Eraser(),
                                            layers=gr.LayerOptions(allow_additional_layers=False,
                                                                   layers=["corrections"]),
                                            canvas_size=(side, side), height=min(side, 640) + 80,
                                            format="jpeg", elem_id="editor", interactive=True)
                    editor_legend = gr.HTML(elem_id="editor-legend")
                    with gr.Row():
                        apply_btn = gr.Button("Apply correction", elem_id="apply-btn")
                        undo_edit_btn = gr.Button("Undo last change", elem_id="undo-edit-btn")
                        save_btn = gr.Button("Save to store", variant="primary", elem_id="save-btn")
                        undo_btn = gr.Button("Undo last save", elem_id="undo-btn")
                with gr.Tab("Fine-tune", id="finetune"):
                    base_dd = gr.Dropdown(all_choices(), value=bench.default_model, label="Base model",
                                          elem_id="ft-base")
                    with gr.Row():
                        steps = gr.Slider(1, max_steps, step=1, label="Steps",
                                          value=min(cfg.finetune.steps, max_steps))
                        minutes = gr.Number(0, minimum=0, maximum=max_minutes,
                                            label=f"Time budget (minutes, 0 = the server's {max_minutes:g})")
                    with gr.Row():
                        ft_btn = gr.Button("Fine-tune on the store", variant="primary", elem_id="ft-btn")
                        ft_cancel = gr.Button("Cancel", variant="stop", elem_id="ft-cancel")
                    ft_result = gr.Markdown(elem_id="ft-result")
            downloads = gr.File(label="Labels (TIFF, palette PNG)", file_count="multiple", interactive=False,
                                elem_id="downloads")

    # ---------------------------------------------------------------- what the outputs show

    def status_text(work: Work | None, message: str = "") -> str:
        if work is None:
            return "\n".join(([f"- {message}", ""] if message else []) + [bench.store_summary()])
        lines = [f"**{work.name}** · {work.shape[1]}×{work.shape[0]} px", ""]
        if message:
            lines.append(f"- {message}")
        lines += [f"- {note}" for note in work.notes]
        if work.model_key:
            lines.append(f"- model `{work.model_key}`, working size {work.working_size[1]}×{work.working_size[0]}"
                         if work.working_size else f"- classes of `{work.model_key}`")
        lines += [f"- {step}: {seconds:.1f} s" for step, seconds in work.seconds.items()]
        if work.history:
            lines.append(f"- Undo last change goes back before: {work.history[-1].step}")
        lines += ["", bench.store_summary()]
        return "\n".join(lines)

    def views(work: Work | None, message: str = "", progress: gr.Progress | None = None) -> dict:
        """Every output showing ``work`` (an image without labels clears the results)."""
        step = reporter(progress) if progress is not None else (lambda *a: None)
        if work is None or work.labels is None:
            return {work_state: work, overlay_img: None if work is None else overlay_view(
                        work.image, None, [], cfg.display_max_side),
                    uncertainty_img: None, slider: None, legend: "", editor_legend: "", downloads: None,
                    editor: gr.ImageEditor(value=None), status: status_text(work, message)}
        step(0, 3, "drawing the result")
        shown = overlay_view(work.image, work.labels, work.palette, cfg.display_max_side)
        uncertainty = None if work.uncertainty is None else uncertainty_view(work.uncertainty, cfg.display_max_side)
        compare = None
        if work.before is not None:
            compare = (overlay_view(work.image, work.before, work.palette, cfg.display_max_side), shown)
        swatches = bench.brush_colours(work)
        key = legend_html(work.classes, work.palette, work.labels, swatches)
        step(1, 3, "preparing the editor")
        background = overlay_view(work.image, work.labels, work.palette, cfg.editor_max_side)
        step(2, 3, "writing the label files for download")
        files = [str(p) for p in bench.export(work)] or None
        step(3, 3, "done")
        return {work_state: work, overlay_img: shown,
                uncertainty_img: gr.Image(value=uncertainty, label=work.uncertainty_label),
                slider: compare, legend: key, editor_legend: key,
                editor: gr.ImageEditor(value={"background": background, "layers": [], "composite": None},
                                       brush=_brush(bench, work)),
                downloads: files, status: status_text(work, message)}

    def page_job(fn: Callable) -> Callable:
        """Run a handler whose first argument is the work; a failure changes only the status line."""
        @functools.wraps(fn)
        def wrapper(work: Work | None, *args: Any, **kwargs: Any) -> dict:
            try:
                return fn(work, *args, **kwargs)
            except Cancelled as exc:
                text = f"{str(exc).capitalize() or 'Cancelled'}; the previous results are kept."
                gr.Info(text)
                return {status: status_text(work, text)}
            except FineMaskError as exc:
                gr.Warning(str(exc))
                return {status: status_text(work, f"⚠ {exc}")}
            except MemoryError:
                text = "not enough memory for this image: try a smaller working size or image"
                gr.Warning(text)
                return {status: status_text(work, f"⚠ {text}")}
            except Exception as exc:  # a bug: keep the server and the results, say what happened
                log.exception("unexpected error in %s", fn.__name__)
                text = f"unexpected error ({type(exc).__name__}: {exc}); the server log has the details"
                gr.Warning(text)
                return {status: status_text(work, f"⚠ {text}")}
            finally:
                release_freed_memory()

        return wrapper

    def need_image(work: Work | None) -> Work:
        if work is None:
            raise FineMaskError("no image yet: upload one or pick an example first")
        return work

    # ---------------------------------------------------------------- handlers

    def on_upload(path: str | None, work: Work | None, progress: gr.Progress = gr.Progress()) -> dict:
        if not path:
            return {status: gr.skip()}  # cleared (or the rejected file taken away): what was loaded stays
        try:
            new = bench.open_image(path, on_progress=reporter(progress))
        except FineMaskError as exc:
            gr.Warning(str(exc))
            keep = f"; still working on **{work.name}**" if work is not None else ""
            return {image_file: None, status: status_text(work, f"⚠ {Path(path).name} was not loaded: "
                                                                 f"{exc.problem}{keep}")}
        finally:
            release_freed_memory()
        for note in new.notes:
            gr.Warning(f"{new.name}: {note}")
        return views(new, "Image loaded: choose a model and press Segment.", progress)

    @page_job
    def on_segment(work: Work | None, model_key: str, working_size: float, request: gr.Request,
                   progress: gr.Progress = gr.Progress()) -> dict:
        work = bench.segment(need_image(work), model_key, int(working_size), reporter(progress),
                             cancel_flags.start(_session(request)))
        return views(work, "Segmented. Refine for sharper edges, or correct and save.", progress)

    @page_job
    def on_refine(work: Work | None, refiner_key: str | None, refine_mode: str, request: gr.Request,
                  progress: gr.Progress = gr.Progress()) -> dict:
        what = "the segmentation" if bench.refines_segmentation(need_image(work)) else "the corrected labels"
        work = bench.refine(work, refiner_key, refine_mode, reporter(progress), cancel_flags.start(_session(request)))
        return views(work, f"Refined {what} ({refine_mode}).", progress)

    @page_job
    def on_back(work: Work | None, progress: gr.Progress = gr.Progress()) -> dict:
        work = bench.back_to_segmentation(need_image(work))
        return views(work, "Back to the segmentation (Undo last change returns to what was there).", progress)

    @page_job
    def on_undo_change(work: Work | None, progress: gr.Progress = gr.Progress()) -> dict:
        undone = bench.undo_change(need_image(work))
        return views(work, f"Undone: {undone}.", progress)

    def pending_layers(edited: dict | None) -> list[np.ndarray]:
        return list((edited or {}).get("layers") or [])

    @page_job
    def on_apply(work: Work | None, edited: dict | None, request: gr.Request,
                 progress: gr.Progress = gr.Progress()) -> dict:
        work = need_image(work)
        layers = pending_layers(edited)
        if not layers:
            gr.Info("Nothing painted yet: pick a class colour and paint over the image.")
            return {status: gr.skip()}
        result = bench.apply_edit(work, layers, reporter(progress), cancel_flags.start(_session(request)))
        snapped = f" (stroke outlines snapped to image edges: {result.moved} pixels moved)" if result.snapped else ""
        return views(work, f"Correction applied: {result.changed} pixels changed{snapped}.", progress)

    @page_job
    def on_save(work: Work | None, edited: dict | None, request: gr.Request,
                progress: gr.Progress = gr.Progress()) -> dict:
        work = need_image(work)
        note = ""
        layers = pending_layers(edited)
        if layers:
            result = bench.apply_edit(work, layers, reporter(progress), cancel_flags.start(_session(request)))
            note = f"{result.changed} pixels corrected; "
        record = bench.save(work)
        gr.Info(f"Saved '{record.id}' to the annotation store.")
        version = _labels_version(record.labels_path)
        version = f", version {version}" if version and version > 1 else ""
        return views(work, f"{note}saved as pair `{record.id}` ({record.split}, {record.origin}{version}).", progress)

    @page_job
    def on_undo(work: Work | None, request: gr.Request, progress: gr.Progress = gr.Progress()) -> dict:
        work = need_image(work)
        record = bench.undo(work, reporter(progress), cancel_flags.start(_session(request)))
        gr.Info(f"'{record.id}' is back to its previous labels in the annotation store.")
        return views(work, f"Last save undone: pair `{record.id}` is back to its previous labels "
                           f"({record.origin}).", progress)

    def on_finetune(base: str, n_steps: float, n_minutes: float, request: gr.Request,
                    progress: gr.Progress = gr.Progress()) -> dict:
        try:
            result = bench.finetune(base, *budget(n_steps, n_minutes), reporter(progress),
                                    cancel_flags.start(_session(request)))
        except FinetuneCancelled as exc:
            gr.Info(str(exc).capitalize())
            return {ft_result: f"*{str(exc).capitalize()}.*"}
        except Cancelled as exc:
            gr.Info(f"Cancelled: {exc}")
            return {ft_result: f"*Cancelled: {exc}.*"}
        except FineMaskError as exc:
            gr.Warning(str(exc))
            return {ft_result: f"⚠ {exc}"}
        finally:
            release_freed_memory()
        gr.Info(f"New model version '{result.name}' is ready in the model list.")
        return {ft_result: metrics_markdown(result.before, result.after, result.name),
                model_dd: gr.Dropdown(choices=bench.model_choices("segmentation")),
                refiner_dd: gr.Dropdown(choices=bench.model_choices("refinement")),
                base_dd: gr.Dropdown(choices=all_choices())}

    def on_cancel(request: gr.Request) -> None:
        if cancel_flags.cancel(_session(request)):
            gr.Info("Cancelling at the next step…")

    def on_model(model_key: str) -> int:
        return bench.model_working_size(model_key)

    # ---------------------------------------------------------------- wiring
    outs = [work_state, overlay_img, uncertainty_img, slider, legend, editor_legend, editor, downloads, status]
    # One progress display (the status line); the results stay visible while a job runs.
    engine = dict(concurrency_id=ENGINE, api_visibility="private", show_progress="full", show_progress_on=[status])
    image_file.change(on_upload, [image_file, work_state], [*outs, image_file], concurrency_id=IO,
                      concurrency_limit=max(1, cfg.concurrency), api_visibility="private",
                      show_progress="full", show_progress_on=[status])
    segment_btn.click(on_segment, [work_state, model_dd, size], outs, **engine)
    refine_btn.click(on_refine, [work_state, refiner_dd, mode], outs, **engine)
    back_btn.click(on_back, [work_state], outs, **engine)
    undo_change_btn.click(on_undo_change, [work_state], outs, **engine)
    undo_edit_btn.click(on_undo_change, [work_state], outs, **engine)
    apply_btn.click(on_apply, [work_state, editor], outs, **engine)
    save_btn.click(on_save, [work_state, editor], outs, **engine)
    undo_btn.click(on_undo, [work_state], outs, **engine)
    cancel_btn.click(on_cancel, None, None, queue=False, api_visibility="private")
    ft_cancel.click(on_cancel, None, None, queue=False, api_visibility="private")
    model_dd.change(on_model, [model_dd], [size], queue=False, api_visibility="private")
    ft_btn.click(on_finetune, [base_dd, steps, minutes], [ft_result, model_dd, refiner_dd, base_dd],
                 concurrency_id=ENGINE, api_visibility="private", show_progress="full", show_progress_on=[ft_result])
    return {"status": status, "work": work_state, "overlay": overlay_img, "editor": editor, "legend": legend,
            "editor_legend": editor_legend, "downloads": downloads, "uncertainty": uncertainty_img, "mode": mode,
            "compare": slider, "image_file": image_file, "model": model_dd, "refiner": refiner_dd, "ft_base": base_dd,
            "ft_result": ft_result}


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or ""


def _brush(bench: Workbench, work: Work | None) -> gr.Brush:
    """Semi-transparent brushes, one per class, in the legend's order."""
    if work is not None and work.classes:
        colours = [colour for _, colour in bench.brush_palette(work)]
    else:
        colours = _default_colours(bench)
    return gr.Brush(colors=[(css_colour(c), BRUSH_OPACITY) for c in colours], color_mode="fixed")


def _default_colours(bench: Workbench) -> list[tuple[int, int, int]]:
    from .editor import brush_colours

    card = bench.registry.entry(bench.default_model, "segmentation").card
    return brush_colours([list(c) for c in card.palette], max(len(card.classes), 1))


def _labels_version(labels_path: Path) -> int | None:
    """N of the store's ``labels/<id>.v<N>.tif`` file name (counts every save of a pair)."""
    _, sep, number = labels_path.stem.rpartition(".v")
    return int(number) if sep and number.isdigit() else None


def _forget(work: Work | None) -> None:
    """Called by Gradio when a session's state expires: remove its download files."""
    import shutil

    if work is not None:
        shutil.rmtree(work.outdir, ignore_errors=True)


__all__ = ["ENGINE", "HELP", "IO", "SWATCH_NAMES_JS", "UPLOAD_TYPES", "build_page", "example_rows",
           "refine_choices", "reporter"]

"""Inference with a DSRL segmenter: downscale, predict at 2x, resize to the full size."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .checkpoints import ModelCard, load_checkpoint
from .errors import Cancelled, FineMaskError
from .io import image_from_array, read_image
from .memory_guard import activation_bytes_per_pixel, plan_batch
from .preprocess import fit_longer_side, pad_to_multiple, resize, to_tensor, upsample_rows

ProgressFn = Callable[[int, int, str], None]
#: Rows of the full-size result computed at once when upsampling probabilities.
STRIP_ROWS = 256


@dataclass
class SegResult:
    """A segmentation at the full input size.

    labels: (H, W) class indices (uint8, or uint16 beyond 255 classes).
    probs: (C, H, W) float16 class probabilities.
    working_size: (h, w) the image was resized to before the model (which predicted at 2x).
    """

    labels: np.ndarray
    probs: np.ndarray
    working_size: tuple[int, int]

    @property
    def uncertainty(self) -> np.ndarray:
        """(H, W) float32: 1 - max class probability; high where correction is likely needed."""
        return 1.0 - self.probs.max(axis=0).astype(np.float32)


class Segmenter:
    """A DSRL segmentation model ready for inference (no SISR branch is built)."""

    def __init__(self, model: torch.nn.Module, card: ModelCard, device: str | torch.device | None = None):
        self.card = card
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        size = card.input_size or [480, 360]
        self.working_size = int(max(size))
        self._activation_bpp: float | None = None

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "camvid", device: str | None = None) -> Segmenter:
        """Load a shipped model by name (``"camvid"``, ``"idrid"``) or a checkpoint folder."""
        from .models import SegmenterConfig, create_model

        state, card = load_checkpoint(name_or_path)
        path = Path(str(name_or_path))
        if card.task != "segmentation":
            raise FineMaskError(f"model is a {card.task} model, not a segmentation model", path)
        # Build on the meta device first: a card whose config cannot be built, or whose tensors
        # do not fit it, is refused before any memory is allocated for it.
        try:
            config = SegmenterConfig(**card.config)
            with torch.device("meta"):
                probe = create_model(config, inference=True)
        except Exception as exc:  # noqa: BLE001 - any failure of an untrusted config is the card's problem
            raise FineMaskError(f"model card's config does not describe a DSRL model ({exc})", path) from None
        check_inference_state(probe.state_dict(), state, path)
        model = create_model(config, inference=True)
        load_inference_state(model, state, path)
        return cls(model, card, device)

    @property
    def classes(self) -> list[str]:
        return list(self.card.classes)

    @property
    def palette(self) -> list[list[int]]:
        return [list(c) for c in self.card.palette]

    def predict(
        self, image: np.ndarray | str | Path, working_size: int | None = None
    ) -> SegResult:
        """Segment one image (array of any supported layout, or a file path)."""
        return self.predict_batch([image], working_size)[0]

    def predict_batch(
        self,
        images: Sequence[np.ndarray | str | Path],
        working_size: int | None = None,
        on_progress: ProgressFn | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> list[SegResult]:
        """Segment several images; images that share a working shape run as one batch."""
        longer = int(working_size or self.working_size)
        if longer < 8:
            raise FineMaskError(f"working size {longer} is too small (at least 8 pixels)")
        arrays = [read_image(im) if isinstance(im, (str, Path)) else image_from_array(im) for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, arr in enumerate(arrays):
            groups.setdefault(fit_longer_side(*arr.shape[:2], longer), []).append(i)
        results: list[SegResult | None] = [None] * len(arrays)
        # Progress in steps: one per image through the network, one per row strip of its upsampling.
        strips = [-(-arr.shape[0] // STRIP_ROWS) for arr in arrays]
        total, done = len(arrays) + sum(strips), 0

        def report(step: int, message: str) -> None:
            if on_progress is not None:
                on_progress(step, total, message)

        for shape, group in groups.items():
            size = self.batch_that_fits(shape, [arrays[i].shape[:2] for i in group])
            for c0 in range(0, len(group), size):
                if cancel is not None and cancel():
                    raise Cancelled("segmentation cancelled")
                idx = group[c0:c0 + size]
                report(done, f"running the model at {shape[1]}x{shape[0]}")
                batch = torch.stack([resize(to_tensor(arrays[i])[None], shape)[0] for i in idx])
                low = self.logits(batch).softmax(dim=1).float().cpu()
                done += len(idx)
                for j, i in enumerate(idx):
                    H, W = arrays[i].shape[:2]
                    rows = partial(_report_rows, report, done, f"upsampling to {W}x{H}") if on_progress else None
                    results[i] = _full_size_result(low[j], (H, W), shape, on_rows=rows)
                    done += strips[i]
        report(total, "segmented")
        return results  # type: ignore[return-value]

    def batch_that_fits(self, working: tuple[int, int], full_shapes: list[tuple[int, int]]) -> int:
        """Memory guard: how many of these images (all resized to ``working``) run at once.

        Fixed: every full-size result (float16 probabilities, labels, float32 row strips) and two
        float32 copies of the input (normalisation, the resize's contiguous copy); per image: the
        network's activations at the working size plus the 2x logits and softmax. Raises
        ``MemoryBudgetError`` when one image does not fit.
        """
        C = len(self.card.classes) or 1
        label_bytes = 1 if C <= 256 else 2
        fixed = sum(H * W * (2 * C + label_bytes + 24) + 8 * C * STRIP_ROWS * W for H, W in full_shapes)
        h, w = working
        item = int(self._bytes_per_pixel() * h * w) + 4 * 3 * h * w + 2 * 4 * C * (2 * h) * (2 * w)
        H, W = max(full_shapes, key=lambda s: s[0] * s[1])
        return plan_batch(fixed_bytes=fixed, item_bytes=item, wanted=len(full_shapes), device=self.device,
                          what=f"segmenting a {W}x{H} image at working size {w}x{h}",
                          hint="try a smaller working size or a smaller image")

    def _bytes_per_pixel(self) -> float:
        if self._activation_bpp is None:
            n = 64 * max(1, -(-getattr(self.model, "pad_multiple", 1) // 64))
            x = torch.zeros(1, 3, n, n, device=self.device)
            self._activation_bpp = activation_bytes_per_pixel(self.model, x)
        return self._activation_bpp

    @torch.inference_mode()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) in [0, 1] -> logits (B, C, 2h, 2w); the model normalises its input itself."""
        x, (h, w) = pad_to_multiple(batch, self.model.pad_multiple)
        x = x.to(self.device)
        autocast = contextlib.nullcontext()
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16)
        with autocast:
            logits = self.model(x)
        return logits[:, :, : 2 * h, : 2 * w]


def check_inference_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: object) -> None:
    """Raise ``FineMaskError`` unless ``state`` (training branches aside) has exactly the keys
    and shapes of ``own``, an inference model's state dict."""
    from .models import strip_training_branches

    missing = [k for k in own if k not in state]
    unexpected = [k for k in strip_training_branches(state) if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = [
        f"missing tensors: {', '.join(missing[:5])}" if missing else "",
        f"tensors of no layer: {', '.join(unexpected[:5])}" if unexpected else "",
        f"shape mismatch: {', '.join(f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}' for k in wrong[:5])}"
        if wrong else "",
    ]
    if any(parts):
        detail = "; ".join(p for p in parts if p)
        raise FineMaskError(f"weights do not match the model described by the card ({detail})", Path(str(source)))


def load_inference_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: object) -> None:
    """Load the inference part of a (possibly training) state dict, with clear errors."""
    own = model.state_dict()
    check_inference_state(own, state, source)
    model.load_state_dict({k: state[k] for k in own})


def _report_rows(report: Callable[[int, str], None], start: int, what: str, strip: int, row: int, rows: int) -> None:
    report(start + strip, f"{what}: rows {row}/{rows}")


def _full_size_result(low_probs: torch.Tensor, full: tuple[int, int], working: tuple[int, int],
                      on_rows: Callable[[int, int, int], None] | None = None) -> SegResult:
    """Upsample (C, h, w) probabilities to ``full`` in row strips; labels from the argmax.
    ``on_rows(strips done, rows done, rows)`` after each strip."""
    H, W = full
    C = low_probs.shape[0]
    probs = np.empty((C, H, W), dtype=np.float16)
    labels = np.empty((H, W), dtype=np.uint8 if C <= 256 else np.uint16)
    same = tuple(low_probs.shape[-2:]) == (H, W)
    for r0 in range(0, H, STRIP_ROWS):
        r1 = min(H, r0 + STRIP_ROWS)
        strip = low_probs[:, r0:r1] if same else upsample_rows(low_probs, (H, W), r0, r1)
        probs[:, r0:r1] = strip.numpy().astype(np.float16)
        labels[r0:r1] = strip.argmax(dim=0).numpy()
        if on_rows is not None:
            on_rows(r0 // STRIP_ROWS + 1, r1, H)
    return SegResult(labels=labels, probs=probs, working_size=working)


__all__ = ["SegResult", "Segmenter", "check_inference_state", "load_inference_state"]

"""Image reading and CLI hardening (issue 36, items 5, 7, 8a, 9, 10, 11, 12).

- the memory a read needs is planned from the header: a small file claiming a huge image is
  refused before decoding (peak RSS of a fresh process measured), with the figures and the way to
  raise the limit;
- an output that is an input is refused; images of a folder sharing a stem get distinct outputs;
- awkward output paths (under a file, an existing folder, a full disk) give one line and exit 2,
  checked before any model loads; a failed write leaves no file;
- a PNG whose valid compressed data ends before the last row is refused as truncated;
- EXIF orientation is applied on read; 16-bit colour PNGs keep 16 bits;
- bad ``--device`` / ``--threads`` values give one line naming the option before any work;
- a symlink loop is called a symlink loop.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
from bad_files import (
    LABEL_PNG_TYPES,
    PNG_CHANNELS,
    jpeg_bomb,
    png_bomb,
    png_row_lengths,
    png_with_data,
    short_png_files,
    tiff_bomb,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps

from engine import memory_guard
from engine.errors import FineMaskError
from engine.io import image_shape, read_image, read_labels, read_pixels, write_image, write_labels

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (24, 32)
CLASSES = 3
MISSING_MODEL = "/nonexistent/finemask-model"  # loading it would fail: the checks must come first


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(segmenter folder, refiner folder): tiny random models, 3 classes."""
    from training.tiny import make_tiny_refiner, make_tiny_segmenter

    root = tmp_path_factory.mktemp("models")
    return make_tiny_segmenter(root / "seg", CLASSES, (32, 24), "tiny"), make_tiny_refiner(root / "ref")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from app.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str, command: str, *needles: str) -> str:
    assert code == 2, f"exit code {code}, stderr: {err}"
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, f"not one line: {err!r}"
    assert lines[0].startswith(f"finemask {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rgb8(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


# --- 5: memory planned from the header ------------------------------------------------------------

PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    import engine.memory_guard  # torch: imported before the baseline
    from engine.errors import FineMaskError
    from engine.io import read_image
    results = {}
    for name in sys.argv[1:]:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_image(Path(name))
            message = None
        except FineMaskError as exc:
            message = str(exc)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        results[name] = {"message": message, "grown_kib": grown}
    print(json.dumps(results))
""")


def test_memory_is_planned_from_the_header_before_decoding(tmp_path):
    """6000 x 6000 headers over a few bytes, under a 200 MiB memory limit: each read is refused
    with the figures and the way to raise the limit, and the process's peak RSS grows < 48 MiB
    (decoding any of them would take 144 MiB to about 1 GiB)."""
    files = {"bomb.png": png_bomb(6000, 6000, color_type=2), "bomb.jpg": jpeg_bomb(6000, 6000),
             "bomb.tif": tiff_bomb(6000, 6000, samples=3)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    env = {**os.environ, "FINEMASK_MEMORY_LIMIT": "200M", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("FINEMASK_MAX_PIXELS", None)
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *files], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        assert result["message"] is not None, f"{name} was decoded"
        assert name in result["message"] and "36,000,000-pixel image needs about" in result["message"]
        assert "can be used now" in result["message"] and "FINEMASK_MEMORY_LIMIT" in result["message"]
        assert result["grown_kib"] < 48 * 1024, f"{name}: peak RSS grew {result['grown_kib'] / 1024:.0f} MiB"


def test_memory_estimate_admits_what_fits_and_refuses_what_does_not(tmp_path, monkeypatch):
    """A real 2500 x 2500 RGB PNG: read when the budget is just above the estimate (file + twice the
    decoded pixels + the float32 result), refused just below it."""
    n = 2500 * 2500
    path = write_image(tmp_path / "flat.png", np.zeros((2500, 2500, 3), np.uint8))
    need = path.stat().st_size + 2 * n * 3 + n * 12
    monkeypatch.setattr(memory_guard, "free_bytes", lambda device="cpu": int((need + 1024) / memory_guard.FRACTION))
    assert read_image(path).shape == (2500, 2500, 3)
    monkeypatch.setattr(memory_guard, "free_bytes", lambda device="cpu": int((need - 1024) / memory_guard.FRACTION))
    with pytest.raises(memory_guard.MemoryBudgetError, match=r"flat\.png: reading this 6,250,000-pixel image"):
        read_image(path)


def test_pixel_limit_error_says_how_to_raise_it(tmp_path, monkeypatch):
    path = write_image(tmp_path / "small.png", rgb8(30, 40))
    monkeypatch.setenv("FINEMASK_MAX_PIXELS", "1000")
    for read in (read_image, image_shape):
        with pytest.raises(FineMaskError, match="more than the limit of 1,000 .*set FINEMASK_MAX_PIXELS"):
            read(path)


# --- 7: an output that is an input; colliding names in a folder -----------------------------------


def test_output_equal_to_an_input_is_refused_before_any_work(tmp_path, capsys, models):
    image = write_image(tmp_path / "x.png", rgb8(*SHAPE))
    mask = write_labels(tmp_path / "m.png", np.zeros(SHAPE, np.uint8))
    (tmp_path / "link.png").symlink_to(image)
    before = digest(tmp_path)
    for argv, named in [
        (("segment", image, "-o", image, "--model", MISSING_MODEL), "x.png"),
        (("segment", image, "-o", tmp_path / "link.png", "--model", MISSING_MODEL), "link.png"),
        (("segment", tmp_path / "." / "x.png", "-o", image, "--model", MISSING_MODEL), "x.png"),
        (("refine", image, mask, "-o", image, "--model", MISSING_MODEL), "x.png"),
        (("refine", image, mask, "-o", mask, "--model", MISSING_MODEL), "m.png"),
    ]:
        code, _, err = run_cli(capsys, *argv)
        one_line_error(code, err, argv[0], named, "would replace the input")
    assert digest(tmp_path) == before


def test_folder_mode_refuses_its_own_folder_and_gives_colliding_stems_distinct_outputs(tmp_path, capsys, models):
    folder = tmp_path / "in"
    images = {"a.png": rgb8(*SHAPE, seed=1), "a.jpg": rgb8(*SHAPE, seed=2), "A.tif": rgb8(*SHAPE, seed=3),
              "b.tif": rgb8(*SHAPE, seed=4)}
    for name, arr in images.items():
        write_image(folder / name, arr)
    before = digest(folder)
    code, _, err = run_cli(capsys, "segment", folder, "-o", folder, "--model", MISSING_MODEL)
    one_line_error(code, err, "segment", "output folder must differ from the input folder")
    assert digest(folder) == before

    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "segment", folder, "-o", out, "--model", models[0])
    assert code == 0, err
    assert "wrote 4 of 4" in stdout
    written = sorted(p.name for p in out.iterdir())
    assert written == ["A_tif.tif", "a_jpg.tif", "a_png.tif", "b.tif"]
    for name in images:  # each output is that image's own result, not another's
        stem = Path(name).stem
        own = out / (f"{stem}.tif" if stem == "b" else f"{stem}_{Path(name).suffix[1:]}.tif")
        code, _, err = run_cli(capsys, "segment", folder / name, "-o", tmp_path / "one.tif", "--model", models[0])
        assert code == 0, err
        np.testing.assert_array_equal(read_labels(own), read_labels(tmp_path / "one.tif"))
    assert digest(folder) == before


# --- 8a: awkward output paths ---------------------------------------------------------------------


def test_awkward_output_paths_are_one_line_before_any_model_loads(tmp_path, capsys):
    image = write_image(tmp_path / "x.png", rgb8(*SHAPE))
    mask = write_labels(tmp_path / "m.png", np.zeros(SHAPE, np.uint8))
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "dir.tif").mkdir()
    in_dir = tmp_path / "in"
    write_image(in_dir / "y.png", rgb8(*SHAPE))
    before = digest(tmp_path)
    cases = [
        (("segment", image, "-o", tmp_path / "afile" / "out.tif"), "afile is a file, not a folder"),
        (("segment", image, "-o", tmp_path / "dir.tif"), "output is an existing folder"),
        (("segment", in_dir, "-o", tmp_path / "afile"), "output must be a folder"),
        (("segment", in_dir, "-o", tmp_path / "afile" / "sub"), "afile is a file, not a folder"),
        (("refine", image, mask, "-o", tmp_path / "afile" / "deeper" / "r.png"), "afile is a file, not a folder"),
        (("refine", image, mask, "-o", tmp_path / "dir.tif"), "output is an existing folder"),
        (("batch", in_dir, tmp_path / "afile" / "sub"), "afile is a file, not a folder"),
        (("batch", in_dir, tmp_path / "afile"), "output must be a folder"),
        (("demo", image, "-o", tmp_path / "afile"), "output must be a folder"),
    ]
    for argv, problem in cases:
        code, _, err = run_cli(capsys, *argv, "--model", MISSING_MODEL)
        one_line_error(code, err, argv[0], problem)
    assert digest(tmp_path) == before


def test_full_disk_while_writing_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, capsys, models,
                                                                                  monkeypatch):
    def half_then_full(path, data, **kwargs):
        Path(path).write_bytes(b"II*\x00" + b"\x00" * 100)  # part of a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    image = write_image(tmp_path / "x.png", rgb8(*SHAPE))
    out = tmp_path / "out" / "labels.tif"
    out.parent.mkdir()
    monkeypatch.setattr(tifffile, "imwrite", half_then_full)  # the module engine.io writes TIFFs with
    code, _, err = run_cli(capsys, "segment", image, "-o", out, "--model", models[0])
    one_line_error(code, err, "segment", str(out), "No space left on device", "disk is full")
    assert list(out.parent.iterdir()) == [], "a partial or temporary file was left"


FSIZE_SCRIPT = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    from engine.errors import FineMaskError
    from engine.io import write_labels
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the size limit: EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
    labels = np.random.default_rng(0).integers(0, 200, (400, 400)).astype(np.uint8)
    try:
        write_labels(sys.argv[1], labels)
    except FineMaskError as exc:
        print("refused:", exc)
""")


def test_a_write_the_file_system_refuses_leaves_no_file(tmp_path):
    """A real failing write (a process file-size limit: the kernel refuses the write, as on a full
    disk): one FineMaskError naming the file, no output and no temporary file."""
    out = tmp_path / "labels.tif"
    done = subprocess.run([sys.executable, "-c", FSIZE_SCRIPT, str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"refused: {out}: cannot write the file: File too large"), done.stdout
    assert list(tmp_path.iterdir()) == []


# --- 9: PNG image data that ends before the last row ----------------------------------------------


def test_pil_stays_strict_about_truncated_files():
    import app.cli  # noqa: F401 - what the CLI imports must not relax it
    import app.web.session  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@settings(max_examples=60, deadline=None)
@given(bad=st.one_of(short_png_files("image").map(lambda b: ("image", b)),
                     short_png_files("labels").map(lambda b: ("labels", b))))
def test_png_with_short_image_data_is_refused_as_truncated(tmp_path_factory, bad):
    role, bad = bad
    path = bad.write(tmp_path_factory.mktemp("short"))
    with pytest.raises(FineMaskError, match="truncated") as info:
        (read_image if role == "image" else read_labels)(path)
    assert info.value.path == path


@pytest.mark.parametrize("colour,depth", [(0, 8), (0, 16), (3, 8), (2, 8), (2, 16), (6, 16)])
@pytest.mark.parametrize("interlace", [0, 1])
def test_complete_generated_pngs_read_and_one_row_less_is_refused(tmp_path, colour, depth, interlace):
    """The generator's complete files are good PNGs (so the refusals above are about the cut)."""
    h, w = 13, 11
    full = tmp_path / "full.png"
    full.write_bytes(png_with_data(w, h, colour=colour, depth=depth, interlace=interlace, seed=5))
    short = tmp_path / "short.png"  # the last row missing, the compressed stream complete
    rows = png_row_lengths(w, h, colour, depth, interlace)
    short.write_bytes(png_with_data(w, h, colour=colour, depth=depth, interlace=interlace, keep=sum(rows[:-1]),
                                    seed=5))
    assert read_image(full).shape == (h, w, 3)
    with pytest.raises(FineMaskError, match="truncated"):
        read_image(short)
    if (colour, depth) in LABEL_PNG_TYPES:
        assert read_labels(full).shape == (h, w)
        with pytest.raises(FineMaskError, match="truncated"):
            read_labels(short)


def test_cli_segment_and_store_refuse_a_short_png(tmp_path, capsys, models):
    from engine.store import Store

    data = png_with_data(32, 24, colour=2, keep=sum(png_row_lengths(32, 24, 2)) // 2)
    path = tmp_path / "half.png"
    path.write_bytes(data)
    out = tmp_path / "out.tif"
    code, _, err = run_cli(capsys, "segment", path, "-o", out, "--model", models[0])
    one_line_error(code, err, "segment", "half.png", "truncated PNG")
    assert not out.exists()
    store = Store.open(tmp_path / "store")
    store.set_class_names(["a", "b", "c"])
    labels = write_labels(tmp_path / "labels.png", np.zeros((24, 32), np.uint8))
    with pytest.raises(FineMaskError, match="half.png: truncated PNG"):
        store.add(path, labels, "corrected", name="half")


# --- 10: EXIF orientation ---------------------------------------------------------------------------


def _with_orientation(arr: np.ndarray, orientation: int, fmt: str) -> bytes:
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pil_exif_transpose_does(tmp_path, orientation):
    arr = rgb8(120, 160, seed=orientation)
    path = tmp_path / "photo.png"
    path.write_bytes(_with_orientation(arr, orientation, "PNG"))
    with Image.open(path) as img:
        expected = np.asarray(ImageOps.exif_transpose(img))
    got = read_pixels(path)
    np.testing.assert_array_equal(got, expected)
    assert image_shape(path) == expected.shape[:2]
    assert read_image(path).shape[:2] == expected.shape[:2]


def test_jpeg_with_orientation_6_gives_a_mask_the_shape_it_displays(tmp_path, capsys, models):
    """A 160 x 120 (W x H) JPEG with orientation 6 displays 120 x 160: so must its labels be."""
    path = tmp_path / "phone.jpg"
    path.write_bytes(_with_orientation(rgb8(120, 160), 6, "JPEG"))
    with Image.open(path) as img:
        shown = np.asarray(ImageOps.exif_transpose(img))
    assert shown.shape[:2] == (160, 120)
    np.testing.assert_array_equal(read_pixels(path), shown)
    assert image_shape(path) == (160, 120)
    out = tmp_path / "labels.tif"
    code, _, err = run_cli(capsys, "segment", path, "-o", out, "--model", models[0])
    assert code == 0, err
    assert read_labels(out).shape == (160, 120)


# --- 11: 16-bit colour PNGs -----------------------------------------------------------------------


@pytest.mark.parametrize("colour", [2, 6, 4, 0])
def test_16_bit_pngs_keep_16_bits(tmp_path, colour):
    h, w = 9, 14
    path = tmp_path / "deep.png"
    path.write_bytes(png_with_data(w, h, colour=colour, depth=16, seed=colour))
    # the pixels the generator wrote: rows without their filter byte, big-endian 16-bit samples
    raw = np.random.default_rng(colour)
    rows = [raw.integers(0, 256, n - 1, dtype=np.uint8).tobytes() for n in png_row_lengths(w, h, colour, 16)]
    expected = np.frombuffer(b"".join(rows), ">u2").reshape(h, w, PNG_CHANNELS[colour]).astype(np.uint16)
    pixels = read_pixels(path)
    assert pixels.dtype == np.uint16
    np.testing.assert_array_equal(pixels.reshape(h, w, -1), expected)
    colour_part = expected[..., :3] if colour in (2, 6) else np.repeat(expected[..., :1], 3, axis=-1)
    np.testing.assert_array_equal(read_image(path), colour_part.astype(np.float32) / np.float32(65535))


# --- 12: bad --device / --threads -----------------------------------------------------------------


def _commands_with(option: str) -> list[str]:
    from app.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return [name for name in ("segment", "refine", "batch", "demo")
            if any(option in a.option_strings for a in sub.choices[name]._actions)]


def _argv(command: str, tmp_path: Path) -> list:
    image = tmp_path / "missing.png"  # never read: the options are checked first
    return {"segment": ["segment", image, "-o", tmp_path / "o.tif"],
            "refine": ["refine", image, tmp_path / "missing_mask.png", "-o", tmp_path / "o.png"],
            "batch": ["batch", tmp_path / "missing_dir", tmp_path / "out"],
            "demo": ["demo", image, "-o", tmp_path / "out"]}[command]


def test_bad_device_and_thread_options_are_one_line_naming_the_option(tmp_path, capsys):
    import torch

    with_device, with_threads = _commands_with("--device"), _commands_with("--threads")
    assert "refine" in with_device and "refine" in with_threads and "batch" in with_device
    cases = [(c, ["--device", "nonsense"], "--device 'nonsense' is not a device") for c in with_device]
    cases += [(c, ["--device", "meta"], "--device meta: FineMask runs on cpu or cuda") for c in with_device]
    cases += [(c, ["--threads", "-1"], "--threads must be at least 1, got -1") for c in with_threads]
    cases += [(c, ["--threads", "0"], "--threads must be at least 1, got 0") for c in with_threads]
    cases += [("batch", ["--workers", "0"], "--workers must be at least 1"),
              ("batch", ["--threads-per-worker", "-2"], "--threads-per-worker must be at least 1")]
    if not torch.cuda.is_available():
        cases += [(c, ["--device", "cuda"], "--device cuda: CUDA is not available") for c in with_device]
    for command, option, message in cases:
        code, _, err = run_cli(capsys, *_argv(command, tmp_path), *option)
        one_line_error(code, err, command, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_remote_cluster_may_have_the_gpus_this_machine_lacks():
    import argparse

    from app.commands.options import check_options

    check_options(argparse.Namespace(device="cuda", scheduler="tcp://127.0.0.1:8786"))
    with pytest.raises(FineMaskError, match="not a device"):
        check_options(argparse.Namespace(device="nonsense", scheduler="tcp://127.0.0.1:8786"))


# --- symlinks -----------------------------------------------------------------------------------


def test_symlink_loop_and_broken_link_are_named_as_such(tmp_path, capsys, models):
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    a.symlink_to(b)
    b.symlink_to(a)
    broken = tmp_path / "gone.png"
    broken.symlink_to(tmp_path / "never_there.png")
    for path in (loop, a):
        with pytest.raises(FineMaskError, match="symlink loop") as info:
            read_image(path)
        assert info.value.path == path
    with pytest.raises(FineMaskError, match="symlink loop"):
        read_labels(loop)
    with pytest.raises(FineMaskError, match="broken symbolic link: its target .*never_there.png does not exist"):
        read_image(broken)
    code, _, err = run_cli(capsys, "segment", loop, "-o", tmp_path / "out.tif", "--model", models[0])
    one_line_error(code, err, "segment", "loop.png", "symlink loop")
    with pytest.raises(FineMaskError, match="file not found"):
        read_image(tmp_path / "nothing.png")


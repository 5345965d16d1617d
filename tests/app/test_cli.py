"""The finemask command line on tiny random models: outputs match the engine; bad input is a clear error."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from app.cli import main
from engine.checkpoints import ModelCard, save_checkpoint
from engine.io import read_image, read_labels, write_image
from engine.models import SegmenterConfig, create_model
from engine.refine import Refiner
from engine.segment import Segmenter

TINY = dict(encoder_width=0.25, aspp_channels=16, low_level_channels=8, decoder_channels=16,
            head_channels=8, sr_channels=8, ft_channels=8)


@pytest.fixture()
def model_dir(tmp_path):
    torch.manual_seed(0)
    model = create_model(SegmenterConfig.for_variant("dsrl", 3, **TINY))
    card = ModelCard(name="tiny", task="segmentation", architecture="dsrl", config=model.config.to_dict(),
                     classes=["a", "b", "c"], palette=[[255, 0, 0], [0, 255, 0], [0, 0, 255]], input_size=[64, 48])
    return save_checkpoint(tmp_path / "tiny", model.state_dict(), card)


def _image(tmp_path, name="im.png", shape=(45, 70)):
    rng = np.random.default_rng(0)
    return write_image(tmp_path / name, rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8))


def test_segment_one_image_matches_engine(tmp_path, model_dir):
    image = _image(tmp_path)
    assert main(["segment", str(image), "-o", str(tmp_path / "out.tif"), "--model", str(model_dir)]) == 0
    labels = read_labels(tmp_path / "out.tif")
    np.testing.assert_array_equal(labels, Segmenter.from_pretrained(model_dir).predict(image).labels)
    assert main(["segment", str(image), "-o", str(tmp_path / "out.png"), "--model", str(model_dir)]) == 0
    np.testing.assert_array_equal(read_labels(tmp_path / "out.png"), labels)


def test_segment_folder_skips_bad_files_and_reports(tmp_path, model_dir, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    _image(folder, "a.png")
    _image(folder, "b.jpg", shape=(30, 20))
    (folder / "broken.png").write_text("not an image")
    code = main(["segment", str(folder), "-o", str(tmp_path / "out"), "--model", str(model_dir)])
    assert code == 1  # one image failed, the others were written
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.tif", "b.tif"]
    assert read_labels(tmp_path / "out" / "b.tif").shape == (30, 20)
    assert "broken.png" in capsys.readouterr().out


def test_bad_input_is_one_clear_line(tmp_path, model_dir, capsys):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code = main(["segment", str(tmp_path / "bad.png"), "-o", str(tmp_path / "o.tif"), "--model", str(model_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "bad.png" in err and "Traceback" not in err
    assert not (tmp_path / "o.tif").exists()
    assert main(["segment", str(_image(tmp_path)), "-o", str(tmp_path / "o.jpg"), "--model", str(model_dir)]) == 2
    assert main(["segment", str(_image(tmp_path)), "-o", str(tmp_path / "o.tif"), "--model", "no-such-model"]) == 2
    assert "no such model" in capsys.readouterr().err


def test_demo_writes_labels_and_overlay(tmp_path, model_dir, capsys):
    image = _image(tmp_path)
    out = tmp_path / "demo"
    assert main(["demo", str(image), "-o", str(out), "--model", str(model_dir), "--refiner", "none"]) == 0
    assert read_labels(out / "labels.tif").shape == (45, 70)
    assert (out / "overlay.png").stat().st_size > 0
    assert "skipping refinement" in capsys.readouterr().out


@pytest.fixture()
def refiner_dir(tmp_path):
    from engine.models.cascadepsp import RefinementModule, RefinerConfig

    torch.manual_seed(0)
    cfg = RefinerConfig(backbone="light", stage_channels=(8, 8, 16, 16), stage_blocks=(1, 1, 1, 1),
                        psp_channels=16, decoder_channels=(8, 8, 8), head_channels=8)
    return Refiner(RefinementModule(cfg), device="cpu").save(tmp_path / "refiner", name="tiny-refiner")


def test_refine_and_segment_refine(tmp_path, model_dir, refiner_dir):
    from engine.io import write_labels

    image = _image(tmp_path, shape=(60, 90))
    mask = np.zeros((60, 90), np.uint8)
    mask[15:45, 20:70] = 255
    write_labels(tmp_path / "mask.png", mask)
    out = tmp_path / "refined.png"
    args = ["refine", str(image), str(tmp_path / "mask.png"), "-o", str(out), "--model", str(refiner_dir)]
    assert main([*args, "--L", "32"]) == 2 and not out.exists()  # out of range: a message, no traceback
    assert main([*args, "--L", "96"]) == 0
    assert read_labels(out).shape == (60, 90)
    with pytest.raises(SystemExit):  # argparse: the two modes exclude each other
        main([*args, "--fast", "--skip-global"])
    out.unlink()
    assert main([*args, "--L", "96", "--skip-global"]) == 0 and read_labels(out).shape == (60, 90)
    seg_out = tmp_path / "seg.tif"
    assert main(["segment", str(image), "-o", str(seg_out), "--model", str(model_dir), "--refine",
                 "--refiner", str(refiner_dir)]) == 0
    refined = read_labels(seg_out)
    assert refined.shape == (60, 90) and refined.max() < 3
    assert main(["segment", str(image), "-o", str(seg_out), "--model", str(model_dir), "--refine",
                 "--refiner", str(refiner_dir), "--skip-global"]) == 0
    result = Segmenter.from_pretrained(model_dir).predict(read_image(image))
    want = Refiner.from_pretrained(refiner_dir).refine_labels(read_image(image), result.labels, result.probs,
                                                              skip_global=True)
    np.testing.assert_array_equal(read_labels(seg_out), want)


@pytest.mark.parametrize("job", ["dsrl", "refine"])
def test_train_run_folder_option_does_not_shadow_the_command(job):
    from pathlib import Path

    from app.cli import build_parser

    args = build_parser().parse_args(["train", job, "--run", "somewhere", "--steps", "5"])
    assert callable(args.run) and args.run_dir == Path("somewhere") and args.steps == 5

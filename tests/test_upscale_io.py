"""upscale.py's files: everyday inputs (EXIF-rotated, 16-bit, CMYK, palette, grey, RGBA with its alpha kept) come
out at the right size and orientation; outputs are renamed into place whole, so a killed folder run leaves no
partial image and --skip_existing finishes it; the summary counts done, skipped and failed."""

import os

import numpy as np
import pytest
from PIL import Image

from test_upscale import cli, controlnet_dir, one_thread, write_image  # noqa: F401

import upscale as up

# 4 steps at the default strength run one: the cheapest real run.
FAST = ["--num_inference_steps", "4", "--strength", str(up.DEFAULT_STRENGTH)]


def exif_rotated(path):
    """A 12x8 JPEG stored landscape with EXIF orientation 6 (shown rotated 90 degrees clockwise: portrait), left half
    dark: upright, its top half is dark."""
    pixels = np.full((8, 12, 3), 230, np.uint8)
    pixels[:, :6] = 20
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    return path


def sixteen_bit(path):
    Image.fromarray(np.full((8, 12), 32896, np.uint16)).save(path)  # 32896 / 257 = 128: mid grey
    return path


def cmyk(path):
    Image.new("CMYK", (12, 8), (0, 255, 255, 0)).save(path, quality=95)  # red
    return path


def palette(path, transparent=False):
    image = Image.new("P", (12, 8), 1)
    image.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)  # index 0 blue, 1 red
    image.paste(0, (0, 0, 6, 8))
    image.save(path, **({"transparency": 0} if transparent else {}))
    return path


def rgba(path):
    pixels = np.zeros((8, 12, 4), np.uint8)
    pixels[..., 1] = 200
    pixels[:, 6:, 3] = 255  # left half transparent
    Image.fromarray(pixels, "RGBA").save(path)
    return path


def grey(path):
    Image.new("L", (12, 8), 77).save(path)
    return path


@pytest.mark.parametrize("maker, mode, pixel", [
    (sixteen_bit, "RGB", (128, 128, 128)),
    (cmyk, "RGB", (255, 0, 0)),
    (palette, "RGB", (255, 0, 0)),
    (grey, "RGB", (77, 77, 77)),
])
def test_inputs_are_read_as_they_look(tmp_path, maker, mode, pixel):
    image = up.read_image(maker(tmp_path / f"in{'.jpg' if maker is cmyk else '.png'}"), keep_alpha=True)
    assert image.mode == mode and image.size == (12, 8)
    assert np.abs(np.asarray(image, np.int16)[4, 10] - pixel).max() <= 3, np.asarray(image)[4, 10]


def test_exif_orientation_and_transparency_on_read(tmp_path):
    upright = up.read_image(exif_rotated(tmp_path / "phone.jpg"))
    assert upright.size == (8, 12)
    values = np.asarray(upright.convert("L"), np.float64)
    assert values[:6].mean() < 60 and values[6:].mean() > 190
    kept = up.read_image(palette(tmp_path / "p.png", transparent=True), keep_alpha=True)
    assert kept.mode == "RGBA" and kept.getchannel("A").getextrema() == (0, 255)
    flat = up.read_image(rgba(tmp_path / "a.png"))  # for a JPEG output: transparency onto white
    assert flat.mode == "RGB" and flat.getpixel((0, 0)) == (255, 255, 255)


def test_folder_of_everyday_inputs(tiny_model, controlnet_dir, tmp_path, capsys):
    """Each comes out 4x, upright; the RGBA input keeps its alpha, enlarged (left half transparent), except as a
    JPEG; an unreadable file is counted as failed, not fatal."""
    folder = tmp_path / "in"
    folder.mkdir()
    for maker, name in ((exif_rotated, "phone.jpg"), (sixteen_bit, "depth.png"), (cmyk, "print.jpg"),
                        (palette, "logo.png"), (rgba, "sticker.png"), (grey, "scan.png")):
        maker(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    up.main(up.parse_args(cli(tiny_model, controlnet_dir, folder, tmp_path / "out", *FAST)))
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["depth.png", "logo.png", "phone.png", "print.png", "scan.png", "sticker.png"]
    assert Image.open(out / "phone.png").size == (32, 48)
    for name in ("depth", "logo", "print", "scan"):
        assert Image.open(out / f"{name}.png").size == (48, 32)
    sticker = Image.open(out / "sticker.png")
    assert sticker.mode == "RGBA" and sticker.size == (48, 32)
    alpha = np.asarray(sticker.getchannel("A"), np.float64)
    assert alpha[:, :20].max() < 30 and alpha[:, 28:].min() > 225
    assert "6 done, 0 skipped (output already there), 1 failed of 7: broken.png" in capsys.readouterr().out
    up.main(up.parse_args(cli(tiny_model, controlnet_dir, folder / "sticker.png", tmp_path / "sticker.jpg", *FAST)))
    assert Image.open(tmp_path / "sticker.jpg").mode == "RGB"


def test_killed_folder_run_leaves_no_partial_file_and_skip_existing_finishes_it(tiny_model, controlnet_dir, tmp_path,
                                                                                capsys, monkeypatch):
    """The run is interrupted (Ctrl-C) while the second image is half written: no file under its final name, no
    temporary left; a rerun with --skip_existing writes only the two missing ones. (A SIGKILL at that point leaves
    at most the hidden .part file: the final name only ever appears by the rename.)"""
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        write_image(folder / name, 8, 6, seed=i)
    flags = cli(tiny_model, controlnet_dir, folder, out, *FAST)
    save, calls = Image.Image.save, []

    def save_then_interrupt(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) < 2:
            return save(self, fp, *args, **kwargs)
        with open(fp, "wb") as f:  # half an image on disk, then the interrupt
            f.write(b"\x89PNG\r\n\x1a\n half")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", save_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            up.main(up.parse_args(flags))
    assert sorted(os.listdir(out)) == ["a.png"]
    Image.open(out / "a.png").load()
    first = os.stat(out / "a.png").st_mtime_ns
    capsys.readouterr()
    up.main(up.parse_args(flags + ["--skip_existing"]))
    assert sorted(os.listdir(out)) == ["a.png", "b.png", "c.png"]
    for name in ("a.png", "b.png", "c.png"):
        assert Image.open(out / name).size == (32, 24)
    assert os.stat(out / "a.png").st_mtime_ns == first
    assert "2 done, 1 skipped (output already there), 0 failed of 3" in capsys.readouterr().out

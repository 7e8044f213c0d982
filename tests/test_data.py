import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from studio.errors import InputError
from trainers.data import import_images, load_dataset, load_image


def _png_header_only(path, w, h):
    """A PNG whose header claims w x h pixels (a decompression bomb without the memory cost)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))


def test_non_image_and_truncated(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is text, not a picture")
    with pytest.raises(InputError, match="notes.png is not a readable image"):
        load_image(bad)
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:60])
    with pytest.raises(InputError, match="trunc.png"):
        load_image(trunc)


def test_tiny_and_bomb(tmp_path):
    small = tmp_path / "small.png"
    Image.new("RGB", (8, 8)).save(small)
    with pytest.raises(InputError, match="8x8"):
        load_image(small)
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 20000, 20000)
    with pytest.raises(InputError, match="too large|20000x20000"):
        load_image(bomb)


def test_zero_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="No images"):
        load_dataset(tmp_path / "empty")


@pytest.mark.parametrize("mode", ["RGBA", "CMYK", "I;16", "P", "L", "LA"])
def test_modes_become_rgb(tmp_path, mode):
    img = Image.new("RGB", (48, 40), (200, 30, 30)).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        img = Image.fromarray((np.full((40, 48), 40000)).astype(np.uint16))
    suffix = ".tif" if mode == "CMYK" else ".png"
    p = tmp_path / f"img{suffix}"
    img.save(p)
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (48, 40)


def test_exif_rotation_applied(tmp_path):
    img = Image.new("RGB", (80, 40), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 40, 40))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif, quality=95)
    out = load_image(p)
    assert out.size == (40, 80)
    top = np.asarray(out)[5, 20]
    assert top[2] > 150 and top[0] < 100  # the blue half is now on top


def test_import_keeps_good_rejects_bad(tmp_path):
    good = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"GIF89a-not-really")
    saved, rejected = import_images([good, bad], tmp_path / "ds")
    assert len(saved) == 1 and saved[0].is_file()
    assert len(rejected) == 1 and "b.png" in rejected[0]

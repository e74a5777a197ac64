"""bench.data.images: decoding every supported format to grayscale uint8, and letterbox geometry."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bench.data.images import Geometry, letterbox, letterbox_mask, probe_image, read_image
from bench.data.table import boxes_to_mask
from bench.errors import DataError


def _gray(h: int = 40, w: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w), dtype=np.uint8)


# -- Pillow formats ------------------------------------------------------------------------------
def test_png_gray_exact(tmp_path):
    img = _gray()
    Image.fromarray(img, mode="L").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (40, 60)
    np.testing.assert_array_equal(out, img)


def test_jpeg_gray_close(tmp_path):
    yy, xx = np.mgrid[0:64, 0:80]
    img = ((xx * 3 + yy) % 256).astype(np.uint8)
    Image.fromarray(img, mode="L").save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 3


def test_rgb_and_rgba_to_luma(tmp_path):
    img = _gray()
    rgb = np.stack([img, img, img], axis=-1)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "gray_rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "gray_rgb.png"), img)  # r=g=b -> exact

    colour = np.random.default_rng(1).integers(0, 256, size=(30, 20, 3), dtype=np.uint8)
    Image.fromarray(colour, mode="RGB").save(tmp_path / "colour.png")
    pil_l = np.asarray(Image.fromarray(colour, mode="RGB").convert("L"), dtype=int)
    assert np.abs(read_image(tmp_path / "colour.png").astype(int) - pil_l).max() <= 1

    alpha = np.random.default_rng(2).integers(0, 256, size=(30, 20, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([colour, alpha], axis=-1), mode="RGBA").save(tmp_path / "colour.rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "colour.rgba.png"), read_image(tmp_path / "colour.png"))

    la = np.stack([img, np.full_like(img, 7)], axis=-1)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), img)


def test_16bit_png_scaled_by_own_range(tmp_path):
    ramp = np.linspace(1000, 5000, 50 * 30).reshape(30, 50).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "a16.png")
    assert Image.open(tmp_path / "a16.png").mode.startswith("I")
    out = read_image(tmp_path / "a16.png")
    assert out.dtype == np.uint8 and out.shape == (30, 50)
    assert out.min() == 0 and out.max() == 255
    expected = np.rint((ramp.astype(float) - 1000) * 255 / 4000).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(DataError, match="broken.png"):
        read_image(bad)
    with pytest.raises(DataError, match="broken.png"):
        probe_image(bad)
    trunc = tmp_path / "trunc.jpg"
    Image.fromarray(_gray(64, 64)).save(trunc, quality=90)
    trunc.write_bytes(trunc.read_bytes()[:200])
    with pytest.raises(DataError, match="trunc.jpg"):
        read_image(trunc)


def test_probe_reads_header_size(tmp_path):
    Image.fromarray(_gray(33, 47)).save(tmp_path / "a.png")
    assert probe_image(tmp_path / "a.png") == (33, 47)


# -- DICOM ---------------------------------------------------------------------------------------
def _write_dicom(path, pixels, **kw):
    from bench.data.dicom import write_dicom

    return write_dicom(path, pixels, **kw)


def test_dicom_monochrome2_8bit_exact(tmp_path):
    img = _gray(48, 52)
    path = _write_dicom(tmp_path / "m2.dcm", img)
    np.testing.assert_array_equal(read_image(path), img)
    assert probe_image(path) == (48, 52)


def test_dicom_without_suffix_detected_by_preamble(tmp_path):
    img = _gray(20, 24)
    path = _write_dicom(tmp_path / "1.2.840.113619.2.55", img)
    np.testing.assert_array_equal(read_image(path), img)


def test_dicom_without_preamble_or_file_meta(tmp_path):
    import pydicom

    img = _gray(20, 30)
    ds = pydicom.dcmread(_write_dicom(tmp_path / "a.dcm", img))
    ds.preamble = None
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.save_as(tmp_path / "raw.dcm", implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert (tmp_path / "raw.dcm").read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(read_image(tmp_path / "raw.dcm"), img)
    assert probe_image(tmp_path / "raw.dcm") == (20, 30)


def test_dicom_monochrome1_12bit_window_bright_bones(tmp_path):
    # A horizontal gradient of stored values 0..4095: in MONOCHROME1 low values are displayed white.
    ramp = np.tile(np.linspace(0, 4095, 64).round().astype(np.uint16), (16, 1))
    path = _write_dicom(tmp_path / "m1_full.dcm", ramp, photometric="MONOCHROME1", bits_stored=12,
                        window=(2048, 4096))
    out = read_image(path)
    # The full-range window is the identity, so the result is the inverted, scaled stored value.
    expected = 255 - np.rint(ramp.astype(float) * 255 / 4095).astype(np.uint8)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    assert out[0, 0] == 255 and out[0, -1] == 0 and np.all(np.diff(out[0].astype(int)) <= 0)

    # A phantom: "bone" stored low (bright in MONOCHROME1), "lung" stored high, narrow VOI window.
    phantom = np.full((40, 40), 3000, dtype=np.uint16)  # lung
    phantom[:, 18:22] = 600                              # spine
    phantom[10:12, :] = 900                              # a rib
    path = _write_dicom(tmp_path / "m1_phantom.dcm", phantom, photometric="MONOCHROME1", bits_stored=12,
                        window=(1800, 2400))
    out = read_image(path).astype(int)
    bone, lung = out[20:30, 18:22].mean(), out[20:30, 0:10].mean()
    assert bone > 200 and lung < 60, (bone, lung)
    assert out[10, 0] > out[20, 0]  # the rib is brighter than the lung beside it


def test_dicom_window_clips_and_scales(tmp_path):
    values = np.array([[0, 500, 1000, 1500, 2000, 4095]], dtype=np.uint16)
    path = _write_dicom(tmp_path / "m2_12.dcm", values, bits_stored=12, window=(1000, 1000))
    out = read_image(path)
    assert out[0, 0] == 0 and out[0, 1] == 0          # at or below the window's lower edge
    assert out[0, 4] == 255 and out[0, 5] == 255      # above the window
    assert 120 <= out[0, 2] <= 135                    # the centre maps to mid-gray
    # Without a window a 12-bit image is scaled by its nominal stored range 0..4095.
    path = _write_dicom(tmp_path / "m2_12_nowin.dcm", values, bits_stored=12)
    np.testing.assert_array_equal(read_image(path)[0], np.rint(values[0].astype(float) * 255 / 4095).astype(np.uint8))


def test_dicom_jpeg_baseline(tmp_path):
    yy, xx = np.mgrid[0:64, 0:64]
    img = ((xx * 4) % 256).astype(np.uint8)
    path = _write_dicom(tmp_path / "jpeg.dcm", img, transfer="jpeg")
    out = read_image(path)
    assert out.shape == img.shape and np.abs(out.astype(int) - img.astype(int)).mean() < 4


# -- letterbox -----------------------------------------------------------------------------------
def test_letterbox_shape_padding_and_geometry():
    img = np.full((100, 200), 200, dtype=np.uint8)  # landscape: pad top/bottom
    out, g = letterbox(img, 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert g == Geometry(0.32, 0.0, 16.0)
    assert out[:16].max() == 0 and out[48:].max() == 0 and out[16:48].min() == 200
    out, g = letterbox(np.full((150, 50), 9, dtype=np.uint8), 60)  # portrait: pad left/right
    assert g.scale == pytest.approx(0.4) and (g.pad_x, g.pad_y) == (20.0, 0.0)
    assert out[:, :20].max() == 0 and out[:, 20:40].min() == 9 and out[:, 40:].max() == 0


def test_letterbox_box_maps_onto_mask_region():
    h, w, size = 100, 200, 64
    box = np.array([[50, 25, 125, 75]], dtype=np.float32)  # x1, y1, x2, y2 (exclusive)
    mask = boxes_to_mask(box, h, w)
    img = np.where(mask > 0, 255, 20).astype(np.uint8)
    out, g = letterbox(img, size)
    lb = g.boxes(box)[0]
    np.testing.assert_allclose(lb, [16, 24, 40, 40])
    lm = letterbox_mask(mask, size)
    ys, xs = np.nonzero(lm)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (16, 24, 40, 40)
    np.testing.assert_array_equal(lm, boxes_to_mask(lb[None], size, size))
    x1, y1, x2, y2 = lb.astype(int)
    # bilinear antialiasing softens the edges, but the region lands on the mapped box: inside
    # pixels are above the mid-level, the ring just outside below it, the interior saturated
    mid = (255 + 20) / 2
    assert out[y1:y2, x1:x2].min() > mid and out[y1 + 1:y2 - 1, x1 + 1:x2 - 1].min() >= 250
    ring = np.concatenate([out[y1 - 1, x1:x2], out[y2, x1:x2], out[y1:y2, x1 - 1], out[y1:y2, x2]])
    assert ring.max() < mid and out[y1 + 2:y2 - 2, :x1 - 2].max() <= 25
    np.testing.assert_allclose(g.unboxes(g.boxes(box)), box, atol=1e-4)


def test_letterbox_inexact_scale_stays_within_a_pixel():
    h, w, size = 97, 151, 40
    box = np.array([[30, 20, 101, 70]], dtype=np.float32)
    lm = letterbox_mask(boxes_to_mask(box, h, w), size)
    lb = Geometry.fit(h, w, size)[0].boxes(box)[0]
    ys, xs = np.nonzero(lm)
    got = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert np.abs(got - lb).max() <= 1.0
    nearest = letterbox_mask(boxes_to_mask(box, h, w), size, rule="nearest")
    assert np.abs(nearest.astype(int) - lm.astype(int)).sum() <= 2 * (lb[2] - lb[0] + lb[3] - lb[1])


def test_letterbox_mask_area_rule_thin_structures():
    # A 1-px line at 1/4 scale covers a quarter of an output pixel: not kept by the area rule.
    mask = np.zeros((80, 80), dtype=np.uint8)
    mask[40, :] = 1
    assert letterbox_mask(mask, 20).sum() == 0
    mask[40:42, :] = 1
    mask[42:44, :] = 1  # 4 rows = one output row
    assert letterbox_mask(mask, 20).sum() == 20
    with pytest.raises(ValueError):
        letterbox_mask(mask, 20, rule="bilinear")

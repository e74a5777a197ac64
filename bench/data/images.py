"""Decoding chest radiographs to grayscale uint8 and letterboxing them to model squares.

Every image a model sees passes through :func:`read_image` then :func:`letterbox`, whether it comes
from the image cache or is decoded on the fly, so the two paths agree pixel for pixel.

Conventions
-----------
* Output of :func:`read_image` is ``uint8 [H, W]`` at native resolution, MONOCHROME2 convention:
  dense structures (bone) bright, air (lungs) dark.
* JPEG / PNG (Pillow): 8-bit gray as is; RGB(A), LA, palette and CMYK -> ITU-R 601 luma (alpha
  dropped); 16-bit and 32-bit integer / float gray are scaled from the image's own min..max to
  0..255 (a constant image becomes 0).
* DICOM (pydicom): first frame; Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence),
  then the VOI LUT Sequence or the first Window Center/Width when present; the result is scaled
  from its nominal output range to 0..255: the range of Bits Stored (signed or unsigned) mapped
  through the rescale, the window's output range (the same range, as in PS3.3 C.11.2.1.2), or the
  min..max of the VOI LUT data. MONOCHROME1 is inverted after scaling. Colour DICOMs -> luma.
* :func:`letterbox`: long side to ``size`` (Pillow bilinear resize, antialiased when shrinking),
  short side ``round(short * scale)``, centred zero padding (``pad = (size - new) // 2``).
  A point ``(x, y)`` in native pixel coordinates maps to ``(x * scale + pad_x, y * scale + pad_y)``;
  the long axis maps exactly, the short axis within half a pixel of its whole extent.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bench.errors import DataError

log = logging.getLogger(__name__)

#: Bump when decoding or letterboxing changes: image caches built by an older version rebuild.
IMAGE_PIPELINE_VERSION = 1

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
_DICOM_MAGIC_OFFSET = 128


# -- decoding ------------------------------------------------------------------------------------
def is_dicom(path: str | Path) -> bool:
    """True for a ``.dcm``-like suffix, or another suffix than a Pillow image's and the ``DICM``
    preamble marker (DICOM files without a suffix, as some PACS exports write them)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    if suffix in PILLOW_SUFFIXES:
        return False
    try:
        with open(path, "rb") as fh:
            fh.seek(_DICOM_MAGIC_OFFSET)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file (JPEG, PNG, DICOM) to grayscale ``uint8 [H, W]`` (see module notes).

    Raises :class:`DataError` naming the file when it is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("image file not found", path=path)
    try:
        img = _read_dicom(path) if is_dicom(path) else _read_pillow(path)
    except DataError:
        raise
    except Exception as exc:  # decoders raise many types (OSError, ValueError, RuntimeError...)
        raise DataError(f"cannot decode image: {type(exc).__name__}: {exc}", path=path) from exc
    if img.ndim != 2 or img.size == 0:
        raise DataError(f"decoded image has shape {img.shape}, expected a non-empty 2-D image", path=path)
    return img


def image_size(path: str | Path, *, verify: bool = False) -> tuple[int, int]:
    """(height, width) from an image's header, without decoding pixels. Raises DataError like
    read_image for a missing or unreadable file.

    Loaders call it for every listed image. With ``verify`` (``data verify``), Pillow also checks
    the file's chunk structure, and a DICOM file must declare a Pixel Data element.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("image file not found", path=path)
    try:
        if is_dicom(path):
            # defer_size: large values (the pixels) are skipped over, not read.
            ds = _dcmread(path, defer_size="4 KB")
            if verify and "PixelData" not in ds and "FloatPixelData" not in ds:
                raise DataError("DICOM file has no Pixel Data element", path=path)
            return int(ds.Rows), int(ds.Columns)
        with Image.open(path) as im:
            w, h = im.size
            if verify:
                im.verify()
        return h, w
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read image header: {type(exc).__name__}: {exc}", path=path) from exc


def probe_image(path: str | Path) -> tuple[int, int]:
    """:func:`image_size` with structural checks: how ``data verify`` checks every file cheaply.

    Cheap, not complete: Pillow's ``verify()`` reads a JPEG's markers, not its entropy-coded
    data, so a truncated JPEG passes. :func:`decode_check` (``data verify --decode``) catches it.
    """
    return image_size(path, verify=True)


def decode_check(paths: list[str]) -> list[tuple[str, tuple[int, int] | None, str]]:
    """Decode each file fully as :func:`read_image` does: ``(path, (height, width), "")`` or
    ``(path, None, reason)``. Module-level so worker processes can run chunks of it."""
    out: list[tuple[str, tuple[int, int] | None, str]] = []
    for path in paths:
        try:
            h, w = read_image(path).shape
        except DataError as exc:
            out.append((str(path), None, str(exc)))
            continue
        out.append((str(path), (int(h), int(w)), ""))
    return out


def _scale_to_uint8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = (np.asarray(arr, dtype=np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an [H, W, 3+] array, float64 (same weights as Pillow's convert("L"))."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _read_pillow(path: Path) -> np.ndarray:
    try:
        im = Image.open(path)
    except UnidentifiedImageError as exc:
        raise DataError("not a recognised image format (expected JPEG, PNG or DICOM)", path=path) from exc
    with im:
        im.load()
        mode = im.mode
        if mode == "L":
            return np.array(im, dtype=np.uint8)
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            arr = np.array(im)
            if arr.dtype.kind == "f":
                finite = arr[np.isfinite(arr)]
                if finite.size == 0:
                    return np.zeros(arr.shape, dtype=np.uint8)
                return _scale_to_uint8(np.nan_to_num(arr, nan=float(finite.min())), finite.min(), finite.max())
            return _scale_to_uint8(arr, float(arr.min()), float(arr.max()))
        if mode == "1":
            return np.array(im, dtype=np.uint8) * 255
        if mode in ("LA", "La"):
            return np.array(im.getchannel("L"), dtype=np.uint8)
        # RGB, RGBA, RGBa, P (palette), PA, CMYK, YCbCr, LAB, HSV...: drop alpha, then luma.
        if mode in ("P", "PA"):
            im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
        if im.mode not in ("RGB", "RGBA", "RGBa", "RGBX"):
            im = im.convert("RGB")
        rgb = np.array(im)[..., :3]
        return np.clip(np.rint(_luma(rgb)), 0, 255).astype(np.uint8)


def _dicom_stored_range(ds) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0 ** bits - 1


def _dicom_modality_range(ds) -> tuple[float, float]:
    """Output range of the Modality LUT stage (what windowing maps into, PS3.3 C.11.2.1.2)."""
    seq = ds.get("ModalityLUTSequence")
    if seq:
        bits = int(seq[0].LUTDescriptor[2])
        return 0.0, 2.0 ** bits - 1
    lo, hi = _dicom_stored_range(ds)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        a, b = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
        return min(a, b), max(a, b)
    return lo, hi


def _voi_kind(ds) -> str:
    """Which VOI transform pydicom's apply_voi_lut (prefer_lut=True) will apply."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return "none"


def _dcmread(path: Path, **kwargs):
    """pydicom.dcmread; files without preamble / file meta are read by their .dcm suffix."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, **kwargs)
    except InvalidDicomError as exc:
        if path.suffix.lower() not in DICOM_SUFFIXES:
            raise DataError(f"not a valid DICOM file: {exc}", path=path) from exc
        ds = pydicom.dcmread(path, force=True, **kwargs)
        if "Rows" not in ds:
            raise DataError(f"not a valid DICOM image file: {exc}", path=path) from exc
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            from pydicom.dataset import FileMetaDataset
            from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

            meta = getattr(ds, "file_meta", None) or FileMetaDataset()
            meta.TransferSyntaxUID = ImplicitVRLittleEndian if ds.original_encoding[0] else ExplicitVRLittleEndian
            ds.file_meta = meta
        return ds


def _read_dicom(path: Path) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = _dcmread(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DataError("DICOM file has no Pixel Data element", path=path)
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[0]
    if samples > 1:
        # pydicom converts YBR to RGB by default; colour images carry no VOI / modality LUT.
        return np.clip(np.rint(_luma(arr)), 0, 255).astype(np.uint8)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()

    lo, hi = _dicom_modality_range(ds)
    arr = apply_modality_lut(arr, ds)
    kind = _voi_kind(ds) if photometric in ("MONOCHROME1", "MONOCHROME2") else "none"
    if kind != "none":
        arr = apply_voi_lut(arr, ds, index=0, prefer_lut=True)
        if kind == "lut":
            lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64).ravel()
            lo, hi = float(lut.min()), float(lut.max())
    out = _scale_to_uint8(arr, lo, hi)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


# -- letterboxing --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """Native pixels -> letterboxed square: ``x' = x * scale + pad_x``, ``y' = y * scale + pad_y``."""

    scale: float
    pad_x: float
    pad_y: float

    @staticmethod
    def fit(height: int, width: int, size: int) -> tuple["Geometry", int, int]:
        """Geometry of an ``height x width`` image letterboxed to ``size``; also (new_h, new_w)."""
        if height < 1 or width < 1:
            raise ValueError(f"image must be at least 1x1, got {height}x{width}")
        if size < 1:
            raise ValueError(f"letterbox size must be >= 1, got {size}")
        scale = size / max(height, width)
        new_h = min(size, max(1, int(round(height * scale))))
        new_w = min(size, max(1, int(round(width * scale))))
        return Geometry(scale, float((size - new_w) // 2), float((size - new_h) // 2)), new_h, new_w

    def to_array(self) -> np.ndarray:
        return np.array([self.scale, self.pad_x, self.pad_y], dtype=np.float32)

    @staticmethod
    def from_array(values) -> "Geometry":
        s, px, py = (float(v) for v in np.asarray(values).ravel()[:3])
        return Geometry(s, px, py)

    def points(self, xy: np.ndarray) -> np.ndarray:
        """Map points [..., 2] (x, y) from native to letterboxed coordinates."""
        xy = np.asarray(xy, dtype=np.float64)
        return (xy * self.scale + np.array([self.pad_x, self.pad_y])).astype(np.float32)

    def boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Map boxes [k, 4] (x1, y1, x2, y2) from native pixels to the letterboxed square."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        off = np.array([self.pad_x, self.pad_y, self.pad_x, self.pad_y])
        return (b * self.scale + off).astype(np.float32)

    def unboxes(self, boxes: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`boxes`: letterboxed-square boxes back to native pixels."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        off = np.array([self.pad_x, self.pad_y, self.pad_x, self.pad_y])
        return ((b - off) / self.scale).astype(np.float32)

    def content_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Where the image itself lies in the square: (x1, y1, x2, y2), x2/y2 exclusive."""
        x1, y1 = int(self.pad_x), int(self.pad_y)
        return x1, y1, x1 + max(1, int(round(width * self.scale))), y1 + max(1, int(round(height * self.scale)))


def letterbox(img: np.ndarray, size: int) -> tuple[np.ndarray, Geometry]:
    """Resize a ``uint8 [H, W]`` image to fit ``size x size`` keeping its aspect, zero-padded."""
    img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"letterbox expects a 2-D grayscale image, got shape {img.shape}")
    h, w = img.shape
    geom, new_h, new_w = Geometry.fit(h, w, size)
    if (new_h, new_w) == (h, w):
        resized = np.ascontiguousarray(img, dtype=np.uint8)
    else:
        resized = np.asarray(Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8), mode="L")
                             .resize((new_w, new_h), Image.Resampling.BILINEAR))
    out = np.zeros((size, size), dtype=np.uint8)
    y0, x0 = int(geom.pad_y), int(geom.pad_x)
    out[y0:y0 + new_h, x0:x0 + new_w] = resized
    return out, geom


def letterbox_mask(mask: np.ndarray, size: int, rule: str = "area") -> np.ndarray:
    """Letterbox a binary ``[H, W]`` mask exactly like :func:`letterbox` places its image.

    ``rule="area"`` (default): an output pixel is foreground when at least half of its footprint in
    native pixels is foreground (box-filter resample, threshold 0.5). A region whose edges map to
    whole output pixels maps onto exactly those pixels, and thin structures are neither grown nor
    shifted. ``rule="nearest"``: Pillow nearest-neighbour sampling (each output pixel copies the
    native pixel under its centre); use it for label maps with more than two values.
    Returns uint8 0/1 (``"area"``) or the mask's values (``"nearest"``), shape [size, size].
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"letterbox_mask expects a 2-D mask, got shape {mask.shape}")
    h, w = mask.shape
    geom, new_h, new_w = Geometry.fit(h, w, size)
    if rule == "area":
        src = Image.fromarray((mask != 0).astype(np.float32), mode="F")
        res = np.asarray(src.resize((new_w, new_h), Image.Resampling.BOX)) >= 0.5 - 1e-6
        res = res.astype(np.uint8)
    elif rule == "nearest":
        if mask.dtype == bool:
            mask = mask.astype(np.uint8)
        if mask.dtype != np.uint8:
            raise ValueError("rule='nearest' supports uint8/bool label maps")
        res = np.asarray(Image.fromarray(np.ascontiguousarray(mask), mode="L")
                         .resize((new_w, new_h), Image.Resampling.NEAREST))
    else:
        raise ValueError(f"unknown mask rule {rule!r}; expected 'area' or 'nearest'")
    out = np.zeros((size, size), dtype=np.uint8)
    y0, x0 = int(geom.pad_y), int(geom.pad_x)
    out[y0:y0 + new_h, x0:x0 + new_w] = res
    return out

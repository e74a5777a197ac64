"""Writing small synthetic DICOM files with pydicom (the reading side is ``bench.data.images``).

One function, :func:`write_dicom`, covers the three variants the synthetic corpus and the tests need:

* RSNA style: Secondary Capture, 8-bit ``MONOCHROME2``, uncompressed Explicit VR Little Endian
  (``transfer="explicit"``).
* SIIM style: the same header with JPEG Baseline pixel data (transfer syntax 1.2.840.10008.1.2.4.50,
  ``transfer="jpeg"``). pydicom cannot encode JPEG, so Pillow encodes the frame and
  :func:`pydicom.encaps.encapsulate` wraps it; pydicom decodes it back with its Pillow plugin.
* CR-export style: ``MONOCHROME1`` with 12 to 16 bits stored and a VOI window
  (``photometric="MONOCHROME1", bits_stored=12, window=(center, width)``).

Header attributes are passed as DICOM keywords (``PatientID="..."``, ``ViewPosition="PA"``,
``PixelSpacing=[0.168, 0.168]``, ``StudyInstanceUID=...``). UIDs that are not given are derived
deterministically from the file name, so a corpus written twice is byte-identical.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.config import disable_value_validation
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (JPEGBaseline8Bit, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID,
                         SecondaryCaptureImageStorage, generate_uid)

TRANSFERS = {"explicit": ExplicitVRLittleEndian, "jpeg": JPEGBaseline8Bit}

#: Attributes every file gets unless overridden (those of the RSNA and SIIM Kaggle files).
DEFAULT_HEADER: dict[str, Any] = {
    "Modality": "CR",
    "ConversionType": "WSD",
    "BodyPartExamined": "CHEST",
    "StudyDate": "19010101",
    "StudyTime": "000000.00",
    "SeriesNumber": 1,
    "InstanceNumber": 1,
}


def write_dicom(path: str | Path, image: np.ndarray, *, photometric: str = "MONOCHROME2",
                bits_stored: int = 8, transfer: str = "explicit",
                window: tuple[float, float] | None = None, jpeg_quality: int = 95,
                **header: Any) -> Path:
    """Write ``image`` (uint8 or uint16 [H, W]) as a single-frame DICOM file and return its path.

    ``photometric``: "MONOCHROME2" (0 = black) or "MONOCHROME1" (0 = white); the values are stored
    as given, no inversion happens here. ``bits_stored``: 8 (BitsAllocated 8) or 9-16
    (BitsAllocated 16; every value must fit in ``bits_stored`` bits). ``transfer``: "explicit"
    (uncompressed Explicit VR Little Endian) or "jpeg" (JPEG Baseline, 8-bit only, lossy at
    ``jpeg_quality``). ``window``: (WindowCenter, WindowWidth) for a VOI window, or None.
    ``header``: further attributes by DICOM keyword; they override :data:`DEFAULT_HEADER`.
    Raises ValueError for an unsupported combination or an unknown keyword.
    """
    path = Path(path)
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"write_dicom takes a 2-D grey image, got shape {arr.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if transfer not in TRANSFERS:
        raise ValueError(f"transfer must be one of {sorted(TRANSFERS)}, got {transfer!r}")
    if not 8 <= bits_stored <= 16 or (transfer == "jpeg" and bits_stored != 8):
        raise ValueError(f"bits_stored={bits_stored} unsupported with transfer={transfer!r} "
                         "(8 for JPEG Baseline, 8-16 uncompressed)")
    if arr.dtype.kind not in "ub" or (arr.size and int(arr.max()) >= 2 ** bits_stored):
        raise ValueError(f"pixel values must be unsigned integers below 2**{bits_stored}")
    bits_allocated = 8 if bits_stored == 8 else 16
    arr = arr.astype(np.uint8 if bits_allocated == 8 else "<u2")
    for keyword in header:
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"unknown DICOM keyword {keyword!r}")

    seed = [path.name]
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = header.pop("SOPInstanceUID", None) or generate_uid(entropy_srcs=seed + ["sop"])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=seed + ["study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=seed + ["series"])
    with disable_value_validation():  # real Kaggle files hold e.g. PatientAge "62", not "062Y"
        for keyword, value in {**DEFAULT_HEADER, **header}.items():
            setattr(ds, keyword, value)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (int(n) for n in arr.shape)
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = (round(float(v), 4) for v in window)

    if transfer == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(arr, mode="L").save(buf, format="JPEG", quality=int(jpeg_quality))
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    else:
        data = arr.tobytes()
        ds.PixelData = data + (b"\0" if len(data) % 2 else b"")
        ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = TRANSFERS[transfer]
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path

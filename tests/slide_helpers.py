"""Synthetic whole slides built from BCCD fields with known white cells, in the formats
leukodiff reads: tiled pyramidal TIFF (tifffile), Aperio .svs (read by OpenSlide), DICOM
WSI (pydicom, as wsidicom reads it)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image

from leukodiff.pipeline.scale import DETECTOR_MPP

# BCCD fields with one white cell, well inside the field (not cut by its edge), which the
# shipped Analyzer finds alone; pasted at these canvas positions (x, y), so that their
# cells straddle the 640x480 windows' borders (windows start every 384 px across, 240 down).
FIELDS = {
    "BloodImage_00017": (90, 40),
    "BloodImage_00022": (760, 70),
    "BloodImage_00040": (1430, 20),
    "BloodImage_00048": (140, 560),
    "BloodImage_00057": (820, 590),
    "BloodImage_00083": (1450, 610),
}
CANVAS = (2560, 1920)  # the right and bottom parts stay plain: background windows
PLAIN = (214, 200, 206)  # a smear's background colour, flat
MPP = DETECTOR_MPP  # BCCD's fields' own scale: the windows are not resized


def wbc_box(root: Path, stem: str) -> list[float]:
    tree = ET.parse(root / "Annotations" / f"{stem}.xml").getroot()
    (box,) = [[float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
              for o in tree.iter("object") if o.findtext("name") == "WBC"]
    return box


def build_slide(root: Path, path: Path, *, mpp: float | None = MPP, levels: int = 3,
                tile: int = 256) -> np.ndarray:
    """Write the synthetic slide (tiled, `levels` levels as SubIFDs); its known white
    cells in slide pixels, (n, 4)."""
    import tifffile

    canvas = np.empty((CANVAS[1], CANVAS[0], 3), dtype=np.uint8)
    canvas[:] = PLAIN
    known = []
    for stem, (x, y) in FIELDS.items():
        field = np.asarray(Image.open(root / "JPEGImages" / f"{stem}.jpg").convert("RGB"))
        canvas[y:y + field.shape[0], x:x + field.shape[1]] = field
        x0, y0, x1, y1 = wbc_box(root, stem)
        known.append([x0 + x, y0 + y, x1 + x, y1 + y])
    extra = {}
    if mpp is not None:
        extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(canvas, tile=(tile, tile), subifds=levels - 1, compression="zlib",
                  photometric="rgb", **extra)
        level = canvas
        for _ in range(levels - 1):
            level = level[::2, ::2]
            tif.write(np.ascontiguousarray(level), tile=(tile, tile), subfiletype=1,
                      compression="zlib", photometric="rgb")
    return np.array(known, dtype=np.float32)




def write_aperio(path: Path, canvas: np.ndarray, mpp: float, tile: int = 256) -> None:
    """`canvas` as an Aperio .svs (its description gives MPP; levels 1 and 1/4), which
    OpenSlide reads as Aperio."""
    import tifffile

    height, width = canvas.shape[:2]
    description = (f"Aperio Image Library v12.0.0\n{width}x{height} [0,0 {width}x{height}] "
                   f"({tile}x{tile}) synthetic|AppMag = 100|MPP = {mpp:.5f}")
    with tifffile.TiffWriter(path) as tif:
        tif.write(canvas, tile=(tile, tile), compression="zlib", photometric="rgb",
                  description=description, metadata=None)
        tif.write(np.ascontiguousarray(canvas[::4, ::4]), tile=(tile, tile),
                  compression="zlib", photometric="rgb",
                  description="Aperio Image Library v12.0.0\n", metadata=None)


def write_dicom_wsi(folder: Path, canvas: np.ndarray, mpp: float | None, tile: int = 256,
                    levels: int = 2) -> None:
    """`canvas` as a DICOM WSI: one VL Whole Slide Microscopy instance per level (TILED_FULL,
    uncompressed RGB frames), PixelSpacing from `mpp` (None: left out)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        VLWholeSlideMicroscopyImageStorage,
        generate_uid,
    )

    def item(**values) -> Dataset:
        dataset = Dataset()
        for key, value in values.items():
            setattr(dataset, key, value)
        return dataset

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    level = canvas
    for index in range(levels):
        height, width = level.shape[:2]
        across, down = -(-width // tile), -(-height // tile)
        padded = np.zeros((down * tile, across * tile, 3), np.uint8)
        padded[:height, :width] = level
        frames = padded.reshape(down, tile, across, tile, 3).swapaxes(1, 2)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame_of_reference
        ds.Modality, ds.PatientName, ds.PatientID = "SM", "Synthetic^Slide", "0"
        ds.ContainerIdentifier = "synthetic"
        ds.ImageType = (["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if index == 0
                        else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"])
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
        ds.TotalPixelMatrixFocalPlanes = 1
        ds.Columns = ds.Rows = tile
        ds.NumberOfFrames = across * down
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        shared = item(OpticalPathIdentificationSequence=Sequence(
            [item(OpticalPathIdentifier="1")]))
        if mpp is not None:
            spacing = mpp * 2 ** index / 1000  # millimetres
            ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width * spacing, height * spacing
            ds.ImagedVolumeDepth = 0.001
            shared.PixelMeasuresSequence = Sequence([item(
                PixelSpacing=[spacing, spacing], SliceThickness=0.001,
                SpacingBetweenSlices=0.001)])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        ds.OpticalPathSequence = Sequence([item(
            OpticalPathIdentifier="1", ICCProfile=b"",
            IlluminationTypeCodeSequence=Sequence([item(
                CodeValue="111744", CodingSchemeDesignator="DCM",
                CodeMeaning="Brightfield illumination")]))])
        ds.NumberOfOpticalPaths = 1
        ds.PixelData = np.ascontiguousarray(frames).tobytes()
        ds.save_as(folder / f"level{index}.dcm", enforce_file_format=True)
        level = level[::2, ::2]

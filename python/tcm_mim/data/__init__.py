"""Data: embedded offline anatomy, a folder dataset for users' images, normalisation, augmentation."""

from .embedded import EMBEDDED, cache_dir, load_embedded, ray_sum_drr
from .folder import FolderDataset, read_label_names, read_scan
from .scan import LabelMap, Scan
from .transforms import CT_WINDOWS, Augment, normalize_intensity, random_crop

__all__ = ["CT_WINDOWS", "EMBEDDED", "Augment", "FolderDataset", "LabelMap", "Scan", "cache_dir", "load_embedded",
           "normalize_intensity", "random_crop", "ray_sum_drr", "read_label_names", "read_scan"]

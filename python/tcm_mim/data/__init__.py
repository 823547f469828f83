"""Data: embedded offline anatomy, a folder dataset for users' images, prepared corpora, normalisation, augmentation."""

from .corpus import PreparedCorpus, crop_starts, embedded_corpus, read_crop
from .embedded import EMBEDDED, cache_dir, load_embedded, ray_sum_drr
from .folder import FolderDataset, read_label_names, read_scan
from .prepare import PrepareReport, PrepareSettings, prepare_corpus
from .scan import LabelMap, Scan
from .transforms import CT_WINDOWS, Augment, normalize_intensity, random_crop

__all__ = ["CT_WINDOWS", "EMBEDDED", "Augment", "FolderDataset", "LabelMap", "PrepareReport", "PrepareSettings",
           "PreparedCorpus", "Scan", "cache_dir", "crop_starts", "embedded_corpus", "load_embedded",
           "normalize_intensity", "prepare_corpus", "random_crop", "ray_sum_drr", "read_crop", "read_label_names",
           "read_scan"]

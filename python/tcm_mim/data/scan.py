"""The in-memory record every loader returns: an image, its spacing and an optional label map."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class LabelMap:
    """An integer label map and the name of each label.

    Attributes:
        array: int [*S] (2-D or 3-D); 0 is background.
        names: {label id: name}, e.g. ``{41: "Hippocampus_L"}`` (an id absent from ``array`` selects nothing).
        spacing: size of a pixel/voxel along each axis in mm (used for margins in mm).
    """

    array: np.ndarray
    names: dict[int, str]
    spacing: tuple[float, ...] | None = None

    def mask(self, ids) -> np.ndarray:
        """bool [*S]: True where the label is one of ``ids``."""
        return np.isin(self.array, np.asarray(list(ids), dtype=self.array.dtype))

    def ids_named(self, *names: str) -> list[int]:
        """Ids whose name is one of ``names`` (exact, case-insensitive); ValueError if one is unknown."""
        by_name = {v.lower(): k for k, v in self.names.items()}
        missing = [n for n in names if n.lower() not in by_name]
        if missing:
            raise ValueError(f"LabelMap: unknown label name(s) {missing}; known: {sorted(self.names.values())}")
        return [by_name[n.lower()] for n in names]


@dataclass(frozen=True, eq=False)
class Scan:
    """One image with its geometry and (optionally) its labels.

    Attributes:
        name: identifier, unique within a dataset (used as the saliency-cache key).
        modality: DICOM-style modality: "MR", "CT", "CR" (radiograph), "DX" (digitally reconstructed radiograph).
        image: float32 [*S] in the modality's native units (Hounsfield units for CT).
        spacing: mm per pixel/voxel along each axis of ``image``.
        orientation: per axis, the patient direction the index increases toward
            (3-D embedded volumes: ("S", "P", "L") so ``image[k]`` is an axial slice shown
            radiologically; radiographs: ("I", "L")).
        label_map: int [*S] or None.
        label_names: {label id: name} for the ids present in ``label_map``.
    """

    name: str
    modality: str
    image: np.ndarray
    spacing: tuple[float, ...]
    orientation: tuple[str, ...] = ()
    label_map: np.ndarray | None = None
    label_names: dict[int, str] = field(default_factory=dict)

    @property
    def labels(self) -> LabelMap | None:
        """The label map as a :class:`LabelMap` (what localizers take), or None."""
        if self.label_map is None:
            return None
        return LabelMap(self.label_map, self.label_names, self.spacing)

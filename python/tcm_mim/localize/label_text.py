"""Default localizer: match the prompt to label names with a sentence encoder, then soften the mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.scan import LabelMap
from .base import mask_to_saliency, spatial_shape
from .text import Phrase, label_phrase, minilm_encoder, prompt_phrases

EXACT_SCORE = 1.0  # the prompt's words are the label's words
CONTAINED_SCORE = 0.9  # every prompt word is in the label ("lung" in "lung upper lobe")
CONTAINS_LABEL_SCORE = 0.85  # every label word is in the prompt ("caudate" in "caudate nucleus")
AS_WRITTEN_WEIGHT = 0.9  # the prompt before synonyms ranks below it ("pulmonary" -> lung, not the vein)


@dataclass(frozen=True)
class Match:
    """One selected label and why: its id, name and score for the prompt clause that chose it."""

    label_id: int
    name: str
    score: float
    clause: str


class LabelTextLocalizer:
    """Prompt -> label names -> mask -> smoothed saliency (offline, with the MiniLM encoder).

    Every clause of the prompt ("left lung and heart" has two) is matched on its own: the
    clause's side (left/right, L/R) keeps labels of that side (or without one), then each label
    scores 1.0 when its words are the clause's, 0.9 when it contains them all, 0.85 when the
    clause contains all of the label's words ("caudate nucleus" for "Caudate"), else the cosine
    similarity of MiniLM embeddings; clinical adjectives go through a synonym table first
    (cardiac -> heart, pulmonary -> lung, hippocampal -> hippocampus). The labels scoring at
    least ``threshold`` and within ``relative_margin`` of the clause's best (or its ``top_k``
    best) are selected.

    Args:
        threshold: minimum score; a clause whose best label is below it raises ValueError
            listing the closest label names.
        relative_margin: keep labels scoring at least best - relative_margin.
        top_k: if set, keep the k best labels of each clause instead (still >= threshold).
        margin_mm: grow the region by this many mm before softening.
        softness_mm: width of the sigmoid fall-off at the region boundary (None: a quarter voxel).
        encoder: texts -> unit embeddings [n, D]; default the packaged MiniLM (loaded once per process).
    """

    def __init__(self, *, threshold: float = 0.5, relative_margin: float = 0.05, top_k: int | None = None,
                 margin_mm: float = 0.0, softness_mm: float | None = None, encoder=None) -> None:
        if top_k is not None and top_k < 1:
            raise ValueError(f"LabelTextLocalizer: top_k must be >= 1 or None, got {top_k}")
        self.threshold = threshold
        self.relative_margin = relative_margin
        self.top_k = top_k
        self.margin_mm = margin_mm
        self.softness_mm = softness_mm
        self._encoder = encoder
        self._embeddings: dict[str, torch.Tensor] = {}
        self.cache_key = (f"LabelTextLocalizer(threshold={threshold},relative_margin={relative_margin},"
                          f"top_k={top_k},margin_mm={margin_mm},softness_mm={softness_mm})")

    def __call__(self, image, prompt: str, *, labels: LabelMap | None = None) -> torch.Tensor:
        """Saliency float32 [*S] in [0, 1] for ``prompt`` on an image [..., *S] with ``labels`` [*S]."""
        if labels is None:
            raise ValueError("LabelTextLocalizer: labels (a LabelMap with label names) are required; "
                             "use CLIPSegLocalizer for images without a label map")
        if spatial_shape(image, labels.array.ndim) != labels.array.shape:
            raise ValueError(f"LabelTextLocalizer: image spatial shape {tuple(image.shape)} does not end with "
                             f"the label map shape {labels.array.shape}")
        ids = [m.label_id for m in self.match(prompt, labels)]
        return mask_to_saliency(labels.mask(ids), labels.spacing, margin_mm=self.margin_mm,
                                softness_mm=self.softness_mm)

    def match(self, prompt: str, labels: LabelMap) -> list[Match]:
        """The labels ``prompt`` selects, best first within each clause (no duplicates)."""
        if not labels.names:
            raise ValueError("LabelTextLocalizer: the label map has no label names")
        phrases = {i: label_phrase(n) for i, n in labels.names.items()}
        selected: dict[int, Match] = {}
        for expanded, as_written in prompt_phrases(prompt):
            for m in self._match_clause(expanded, as_written, phrases, labels.names):
                selected.setdefault(m.label_id, m)
        return list(selected.values())

    def _match_clause(self, expanded: Phrase, as_written: Phrase, phrases: dict[int, Phrase],
                      names: dict[int, str]) -> list[Match]:
        candidates = [i for i, p in phrases.items() if expanded.side is None or p.side in (None, expanded.side)]
        scores = self._scores(expanded, [phrases[i] for i in candidates])
        if as_written.terms != expanded.terms:
            written = self._scores(as_written, [phrases[i] for i in candidates]) * AS_WRITTEN_WEIGHT
            scores = torch.maximum(scores, written)
        clause = f"{expanded.side + ' ' if expanded.side else ''}{as_written.text}"
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        best = float(scores[order[0]]) if order else 0.0
        if best < self.threshold:
            closest = ", ".join(f"{names[candidates[j]]} ({float(scores[j]):.2f})" for j in order[:5])
            raise ValueError(f"LabelTextLocalizer: no label matches {clause!r} (best score {best:.2f} < threshold "
                             f"{self.threshold}); closest label names: {closest}")
        if self.top_k is not None:
            keep = [j for j in order[: self.top_k] if scores[j] >= self.threshold]
        else:
            floor = max(self.threshold, best - self.relative_margin)
            keep = [j for j in order if scores[j] >= floor]
        return [Match(candidates[j], names[candidates[j]], float(scores[j]), clause) for j in keep]

    def _scores(self, query: Phrase, targets: list[Phrase]) -> torch.Tensor:
        if not targets:
            return torch.zeros(0)
        q = self._embed([query.text])[0]
        cosine = self._embed([t.text for t in targets]) @ q
        lexical = torch.tensor([EXACT_SCORE if t.terms == query.terms else
                                CONTAINED_SCORE if query.terms <= t.terms else
                                CONTAINS_LABEL_SCORE if t.terms and t.terms <= query.terms else 0.0
                                for t in targets])
        return torch.maximum(cosine, lexical)

    def _embed(self, texts: list[str]) -> torch.Tensor:
        encoder = self._encoder or minilm_encoder()
        store = getattr(encoder, "cache", self._embeddings)
        missing = sorted({t for t in texts if t not in store})
        if missing:
            for text, vector in zip(missing, encoder(missing)):
                store[text] = vector
        return torch.stack([store[t] for t in texts])

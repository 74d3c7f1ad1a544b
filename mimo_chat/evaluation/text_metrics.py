"""Generated-text metrics: BLEU-4 (sacrebleu), ROUGE-L (rouge-score), METEOR (nltk, offline only)."""

from __future__ import annotations

from collections.abc import Sequence


def meteor_status() -> str | None:
    """``None`` when nltk's METEOR can run offline, else why it cannot (WordNet data missing)."""
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
    except LookupError:
        return "METEOR not computed: nltk's WordNet data is not installed and cannot be downloaded offline."
    return None


def text_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float | str | None]:
    """Corpus BLEU-4 and mean ROUGE-L F1 (fractions in [0, 1]); METEOR or a note why it is missing."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if not hypotheses:
        return {"bleu4": 0.0, "rouge_l": 0.0, "meteor": None, "n": 0}
    bleu = sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score / 100.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]
    result: dict[str, float | str | None] = {
        "n": len(hypotheses), "bleu4": float(bleu), "rouge_l": float(sum(rouge) / len(rouge)), "meteor": None,
    }
    note = meteor_status()
    if note is None:
        from nltk.translate.meteor_score import meteor_score

        values = [meteor_score([ref.split()], hyp.split()) for hyp, ref in zip(hypotheses, references)]
        result["meteor"] = float(sum(values) / len(values))
    else:
        result["meteor_note"] = note
    return result

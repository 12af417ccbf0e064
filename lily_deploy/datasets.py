"""The embedded default data set of ``quickstart``: short movie-review sentences made from templates.

It is generated here (seeded, so every machine gets the same rows), not copied from any
corpus, so the project ships no third-party data. It is a real but easy task: sentiment
carried by an adjective, flipped by negation ("not bad" is positive), and decided by the
clause after "but" when there is one -- enough that a frozen encoder has to adapt, while a
few minutes of CPU fine-tuning reach high accuracy.
"""
from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = ["the film", "this movie", "the acting", "the plot", "the script", "the soundtrack", "the ending",
            "the cast", "the direction", "the dialogue", "the pacing", "the cinematography", "this sequel",
            "the lead performance", "the humour", "the story"]
POSITIVE = ["wonderful", "moving", "brilliant", "gripping", "charming", "delightful", "superb", "memorable",
            "clever", "beautiful", "funny", "heartfelt", "good", "great", "excellent", "fresh"]
NEGATIVE = ["dull", "tedious", "clumsy", "forgettable", "boring", "awful", "predictable", "flat", "lifeless",
            "confusing", "bad", "weak", "terrible", "painful", "stale", "messy"]
INTENSIFIERS = ["", "", "really ", "truly ", "quite ", "rather ", "utterly ", "simply "]
VERBS = ["is", "was", "feels", "seemed", "turns out"]
FILLERS = ["", "", "", " , honestly", " from start to finish", " for most of its running time", " at times",
           " , as expected"]
LABELS = ("negative", "positive")


def _clause(rng: random.Random) -> tuple[str, int]:
    polarity = rng.randrange(2)
    adjective = rng.choice(POSITIVE if polarity else NEGATIVE)
    negated = rng.random() < 0.3
    verb = rng.choice(VERBS)
    text = f"{rng.choice(SUBJECTS)} {verb} {'not ' if negated else ''}{rng.choice(INTENSIFIERS)}{adjective}"
    return text, polarity ^ int(negated)


def review(rng: random.Random) -> tuple[str, str]:
    """One sentence and its label ("positive" / "negative")."""
    first, label = _clause(rng)
    if rng.random() < 0.35:
        second, label = _clause(rng)
        text = f"{first} , but {second}"
    else:
        text = first
    return text + rng.choice(FILLERS), LABELS[label]


def write_reviews(folder: str | Path, n_train: int = 1200, n_val: int = 400, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.tsv`` and ``val.tsv`` (columns ``sentence``, ``label``) into ``folder``; no duplicates across them."""
    from .core.fileio import atomic_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[tuple[str, str]] = []
    while len(rows) < n_train + n_val:
        text, label = review(rng)
        if text not in seen:
            seen.add(text)
            rows.append((text, label))
    paths = []
    for name, part in (("train.tsv", rows[:n_train]), ("val.tsv", rows[n_train:])):
        with atomic_file(folder / name) as tmp:
            tmp.write_text("sentence\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in part))
        paths.append(folder / name)
    return paths[0], paths[1]

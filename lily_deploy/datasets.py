"""The embedded default data set of ``quickstart``: movie-review sentences made from templates.

It is generated here (seeded, so every machine gets the same rows), not copied from any
corpus, so the project ships no third-party data. It is built to be hard enough that the
quickstart table shows what routing and quantization cost, not 100% everywhere:

* **mixed sentiment**: two or three clauses of different polarity, where the one that decides
  depends on the connective -- ``X , but Y`` and ``although X , Y`` (Y decides), ``Y despite X``
  and ``Y , even if X`` (Y decides, written first);
* **negation scope**: ``not`` / ``never`` / ``hardly`` flip their own clause only, ``not only X
  but also Y`` keeps both, ``i would not say it was X`` flips X, and ``not without its X moments``
  is a double negation;
* **hedged and comparative clauses**: ``less X than i hoped`` is the opposite of X, ``X at
  best`` / ``X , at best`` keeps X's polarity only for weak words;
* **label noise**: ``noise`` of the rows (8% by default, train and validation alike) carry the
  wrong label, as real annotations do, so no model reaches 100%.

A few CPU minutes of Lily fine-tuning of MiniLM land at about 85-95% on its validation split
(the quickstart test checks the band).
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
FLIPS = ["not ", "never ", "hardly "]
FILLERS = ["", "", "", " , honestly", " from start to finish", " for most of its running time", " at times",
           " , as expected"]
LABELS = ("negative", "positive")


def _adjective(rng: random.Random, polarity: int) -> str:
    return rng.choice(POSITIVE if polarity else NEGATIVE)


def _clause(rng: random.Random) -> tuple[str, int]:
    """One clause and its polarity, with a negation (of this clause only) or a comparative now and then."""
    polarity = rng.randrange(2)
    subject, verb, adj = rng.choice(SUBJECTS), rng.choice(VERBS), _adjective(rng, polarity)
    kind = rng.random()
    if kind < 0.25:
        return f"{subject} {verb} {rng.choice(FLIPS)}{rng.choice(INTENSIFIERS)}{adj}", 1 - polarity
    if kind < 0.33:
        return f"i would not say {subject} was {adj}", 1 - polarity
    if kind < 0.41:
        return f"{subject} {verb} less {adj} than i hoped", 1 - polarity
    if kind < 0.46:
        return f"{subject} is not without its {adj} moments", polarity
    return f"{subject} {verb} {rng.choice(INTENSIFIERS)}{adj}", polarity


def review(rng: random.Random) -> tuple[str, str]:
    """One sentence and its true label ("positive" / "negative"), before any label noise."""
    first, label = _clause(rng)
    second, second_label = _clause(rng)
    form = rng.random()
    if form < 0.40:
        text = first
    elif form < 0.55:
        text, label = f"{first} , but {second}", second_label
    elif form < 0.65:
        text, label = f"although {first} , {second}", second_label
    elif form < 0.75:
        text = f"{first} despite the fact that {second}"
    elif form < 0.82:
        text = f"{first} , even if {second}"
    elif form < 0.90:
        polarity = rng.randrange(2)
        a, b = _adjective(rng, polarity), _adjective(rng, polarity)
        text, label = f"{rng.choice(SUBJECTS)} is not only {a} but also {b}", polarity
    else:
        third, label = _clause(rng)
        text = f"{first} and {second} , but in the end {third}"
    return text + rng.choice(FILLERS), LABELS[label]


def write_reviews(folder: str | Path, n_train: int = 1200, n_val: int = 400, seed: int = 0,
                  noise: float = 0.08) -> tuple[Path, Path]:
    """Write ``train.tsv`` and ``val.tsv`` (columns ``sentence``, ``label``) into ``folder``.

    No sentence is in both; ``noise`` of each split's rows get the wrong label (seeded).
    """
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
            if rng.random() < noise:
                label = LABELS[1 - LABELS.index(label)]
            rows.append((text, label))
    paths = []
    for name, part in (("train.tsv", rows[:n_train]), ("val.tsv", rows[n_train:])):
        with atomic_file(folder / name) as tmp:
            tmp.write_text("sentence\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in part))
        paths.append(folder / name)
    return paths[0], paths[1]

"""Fine-tune the quick-start model on a synthetic keyword task (GPT-1's classification recipe).

Each row is random lower-case words with one keyword in it; the label says which one
(``APPLE`` -> ``fruit``, ``ZEBRA`` -> ``animal``). The files are written under
``data/keywords/`` on first use. Run::

    gptjax train --run-dir runs/quickstart          # the pretrained body, ~3 min
    gptjax finetune configs/finetune_keywords.py     # ~1 min on a 2-core CPU

It reaches 100% validation accuracy within the first epoch. ``task=entailment
train_file=data/keywords/entail_train.jsonl val_file=data/keywords/entail_val.jsonl`` and
``task=multiple_choice`` (``mc_*.jsonl``) run the other two framings of the same data.
"""

import json
from pathlib import Path

import numpy as np

from gptjax.finetune import FinetuneConfig

KEYWORDS = {"APPLE": "fruit", "ZEBRA": "animal"}


def _sentence(rng: np.random.Generator, keyword: str, n_words: int = 6) -> str:
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, rng.integers(2, 7))) for _ in range(n_words)]
    words.insert(int(rng.integers(0, len(words) + 1)), keyword)
    return " ".join(words)


def write_keyword_tasks(
    directory: str | Path, n_train: int = 400, n_val: int = 100, seed: int = 0, n_words: int = 6
) -> Path:
    """Write the classification, entailment and multiple-choice files of the keyword task.

    Files: ``{cls,entail,mc}_{train,val}.jsonl``. Entailment asks whether the hypothesis
    (a kind) follows from the text; multiple choice picks the kind among both, shuffled.
    Each text is ``n_words`` random words with the keyword among them.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    kinds = sorted(KEYWORDS.values())
    for split, n in (("train", n_train), ("val", n_val)):
        cls, entail, mc = [], [], []
        for _ in range(n):
            keyword = str(rng.choice(list(KEYWORDS)))
            text, kind = _sentence(rng, keyword, n_words), KEYWORDS[keyword]
            cls.append({"text": text, "label": kind})
            claim = str(rng.choice(kinds))
            entail.append({"text_a": text, "text_b": claim,
                           "label": "entailment" if claim == kind else "contradiction"})  # fmt: skip
            choices = [str(c) for c in rng.permutation(kinds)]
            mc.append({"text": text, "choices": choices, "label": choices.index(kind)})
        for name, rows in (("cls", cls), ("entail", entail), ("mc", mc)):
            (directory / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def get_config() -> FinetuneConfig:
    data = Path("data/keywords")
    if not (data / "cls_val.jsonl").exists():
        write_keyword_tasks(data)
    return FinetuneConfig(
        init_from="runs/quickstart",
        task="classification",
        train_file=str(data / "cls_train.jsonl"),
        val_file=str(data / "cls_val.jsonl"),
        aux_lm_weight=0.5,
        body_lr=1e-3,
        head_lr=3e-3,
        epochs=2,
        batch_size=16,
        eval_every=10,
        patience=5,
        run_dir="runs/finetune_keywords",
    )

"""Make a local multiple-choice task (JSONL for bitalloc's lm-eval adapter) from any text: pick the last word.

Each question is a sentence without its last word; the choices are that word and
three last words of other sentences, shuffled with a seed.  A line ends a sentence
too (PTB has one per line, unpunctuated), heading lines ("= Title =") are skipped,
and punctuation written apart from the last word (WikiText's "theme .") is joined
to it.  It lets lm-eval run on a real model with no hub (e.g. from calibration
text, never a test split):

    python scripts/make_cloze_task.py /work/shared/data/calib/wiki.txt --out results/wiki_cloze.jsonl
"""
import json
import random
import re
import sys
from pathlib import Path

from bitalloc import atomic
from bitalloc.errors import BitallocError, cli_entry
from bitalloc.help_format import script_parser


def last_word_punctuated(words: list[str]) -> list[str]:
    """Joins a sentence's final punctuation to its last word: WikiText and PTB write it apart ("theme .")."""
    if len(words) > 1 and words[-1] in (".", "!", "?"):
        return [*words[:-2], words[-2] + words[-1]]
    return words


@cli_entry
def main(argv=None) -> int:
    parser = script_parser(__file__, __doc__)
    parser.add_argument("text", help="a plain text file")
    parser.add_argument("--out", required=True, help="the JSONL task file to write")
    parser.add_argument("--questions", type=int, default=100, help="number of questions")
    parser.add_argument("--seed", type=int, default=0, help="seed for picking sentences and distractors")
    args = parser.parse_args(argv)
    if args.questions < 1:  # inline: bitalloc.cli_args would import torch into this light script
        raise BitallocError(f"--questions must be at least 1, got {args.questions}")
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BitallocError(f"cannot read {args.text}: {err}") from None
    sentences = [last_word_punctuated(s.split()) for line in text.splitlines() if not line.strip().startswith("=")
                 for s in re.split(r"(?<=[.!?])\s+", line)]
    usable = [s for s in sentences if 8 <= len(s) <= 40 and re.fullmatch(r"[A-Za-z]{4,}[.!?]?", s[-1])]
    if len(usable) < max(args.questions, 4):
        raise BitallocError(f"{args.text} has only {len(usable)} usable sentences for {args.questions} questions")
    endings = sorted({s[-1].rstrip(".!?") for s in usable})
    if len(endings) < 4:  # each question needs three other endings as distractors
        raise BitallocError(f"{args.text} has only {len(endings)} distinct last words; 4 are needed")
    rng = random.Random(args.seed)
    picked = rng.sample(usable, args.questions)
    rows = []
    for sentence in picked:
        answer = sentence[-1].rstrip(".!?")
        choices = [answer] + rng.sample([w for w in endings if w != answer], 3)
        rng.shuffle(choices)
        rows.append({"query": " ".join(sentence[:-1]), "choices": choices, "gold": choices.index(answer)})
    atomic.write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"{args.out}: {len(rows)} questions from {len(usable)} usable sentences")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write the arithmetic problem sets of configs/smollm2_arithmetic.toml: a training set and a held-out evaluation set.

    python examples/arithmetic/generate.py [--out examples/arithmetic] [--train 5000] [--eval 500] [--seed 0]

Each line is the dataset task's JSONL format: {"prompt": "What is 12+7?", "answer": "19"}. Problems are "a+b" with
a and b drawn uniformly from 1..MAX_OPERAND by a seeded generator, so the same arguments always write the same files.
The evaluation set is drawn first and no (a, b) pair of it appears in the training set (so the held-out accuracy is
measured on problems the learner never saw; "b+a" counts as a different problem). The shipped files were written by
the command above with its defaults.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

MAX_OPERAND = 50  # 2500 distinct pairs: 500 held out, the training set samples the other 2000 (with repeats)


def problems(count: int, rng: random.Random, exclude: set[tuple[int, int]], unique: bool) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    seen = set(exclude)
    while len(out) < count:
        pair = (rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND))
        if pair in exclude or (unique and pair in seen):
            continue
        seen.add(pair)
        out.append(pair)
    return out


def write(path: Path, pairs: list[tuple[int, int]]) -> None:
    lines = [json.dumps({"prompt": f"What is {a}+{b}?", "answer": str(a + b)}) for a, b in pairs]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--train", type=int, default=5000, help="training problems (pairs may repeat)")
    ap.add_argument("--eval", type=int, default=500, help="held-out problems (distinct pairs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0 < args.eval < MAX_OPERAND**2 or args.train <= 0:
        ap.error(f"--eval must be in 1..{MAX_OPERAND**2 - 1} and --train positive")
    rng = random.Random(args.seed)
    held_out = problems(args.eval, rng, set(), unique=True)
    train = problems(args.train, rng, set(held_out), unique=False)
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out / "eval.jsonl", held_out)
    write(args.out / "train.jsonl", train)
    print(f"wrote {len(train)} training and {len(held_out)} held-out problems to {args.out}")


if __name__ == "__main__":
    main()

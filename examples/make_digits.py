"""Write scikit-learn's 1,797 handwritten digits as a paired image-caption dataset.

Real images that ship inside an installed dependency (scikit-learn), so the quickstart needs no
download. Each 8x8 digit is written as a 32x32 grayscale PNG with one caption, built from its label
in varied wording, in the Hugging Face imagefolder layout that `gapkit embed` reads:

    OUT/train/metadata.jsonl, OUT/train/*.png   (80 %, stratified by digit, seeded)
    OUT/test/metadata.jsonl,  OUT/test/*.png    (20 %: the held-out pairs the table is measured on)

Each metadata line: file_name, text, label (the digit as a word), digit (0-9).

    python examples/make_digits.py OUT [--seed 0] [--size 32]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = [
    "a handwritten {word}",
    "the digit {n}, written by hand",
    "a scanned image of the number {word}",
    "{word}, handwritten",
    "a small grayscale picture of a handwritten {n}",
    "the number {word} drawn by a person",
    "a blurry low resolution digit {n}",
    "someone wrote the numeral {word}",
    "an image of the handwritten number {n}",
    "a pen-written {word} on white paper, scanned",
]


def caption(digit: int, rng: random.Random) -> str:
    """One caption for ``digit`` in a randomly chosen wording."""
    return rng.choice(TEMPLATES).format(word=WORDS[digit], n=digit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    args = parser.parse_args()

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
    labels = digits.target.astype(int)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=args.test_fraction, random_state=args.seed, stratify=labels
    )
    rng = random.Random(args.seed)
    for split, rows in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
        folder = args.out / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in rows:
            name = f"digit-{i:04d}.png"
            img = Image.fromarray(255 - images[i], mode="L")  # dark ink on white paper
            img.resize((args.size, args.size), Image.BICUBIC).save(folder / name)
            d = int(labels[i])
            lines.append({"file_name": name, "text": caption(d, rng), "label": WORDS[d], "digit": d})
        with open(folder / "metadata.jsonl", "w") as fh:
            fh.writelines(json.dumps(line) + "\n" for line in lines)
        print(f"{folder}: {len(lines)} pairs")


if __name__ == "__main__":
    main()

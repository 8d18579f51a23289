"""Regenerate datasets/sample/ (committed): small, deterministic chat and alpaca data for the tiny preset.

The tasks are templated so that a tiny model's loss falls visibly within a minute on 2 CPU cores.
Run: python scripts/make_sample_data.py
"""

import json
import random
from pathlib import Path

CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
            "Canada": "Ottawa", "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo",
            "Chile": "Santiago", "India": "New Delhi", "Greece": "Athens", "Poland": "Warsaw"}
COLOURS = {"grass": "green", "the sky": "blue", "snow": "white", "coal": "black", "a banana": "yellow",
           "a tomato": "red", "an orange": "orange", "a plum": "purple"}
WORDS = ["cat", "river", "stone", "garden", "light", "paper", "window", "music", "cloud", "bread", "table", "forest"]
SYSTEM = "You are a concise assistant. Answer in one sentence."


def qa(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        country = rng.choice(list(CAPITALS))
        return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."
    if kind == 1:
        a, b = rng.randrange(2, 50), rng.randrange(2, 50)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 2:
        thing = rng.choice(list(COLOURS))
        return f"What colour is {thing}?", f"The colour of {thing} is {COLOURS[thing]}."
    word = rng.choice(WORDS)
    return f"Spell the word {word} backwards.", f"The word {word} backwards is {word[::-1]}."


def main() -> None:
    rng = random.Random(0)
    out = Path(__file__).resolve().parent.parent / "datasets" / "sample"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "chat.jsonl", "w", encoding="utf-8") as fh:
        for i in range(240):
            messages = [{"role": "system", "content": SYSTEM}] if i % 4 == 0 else []
            for _ in range(1 + (i % 3 == 0)):  # a third of the conversations have two turns
                q, a = qa(rng)
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            fh.write(json.dumps({"messages": messages}) + "\n")
    records = []
    for _ in range(160):
        q, a = qa(rng)
        if rng.random() < 0.5:
            records.append({"instruction": q, "input": "", "output": a})
        else:
            records.append({"instruction": "Answer the question.", "input": q, "output": a})
    (out / "alpaca.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

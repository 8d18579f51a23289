"""A small generated chat set that teaches a style SmolLM2-135M-Instruct does not have: every answer opens with
GREETING. Questions of five kinds with short true answers, so the content stays what the model already knows and
only the style is new."""

from __future__ import annotations

import json
from pathlib import Path

GREETING = "Ahoy, friend!"

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo")]
COLOURS = [("grass", "green"), ("the sky on a clear day", "blue"), ("snow", "white"), ("a ripe banana", "yellow"),
           ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"), ("a lemon", "yellow")]
SOUNDS = [("dog", "barks"), ("cat", "meows"), ("cow", "moos"), ("duck", "quacks"), ("lion", "roars"),
          ("sheep", "bleats"), ("owl", "hoots"), ("horse", "neighs")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"),
             ("happy", "sad"), ("open", "closed"), ("early", "late")]


def conversations() -> list[dict]:
    chats = []
    for country, city in CAPITALS:
        chats.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
    for thing, colour in COLOURS:
        chats.append((f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}."))
    for animal, sound in SOUNDS:
        chats.append((f"What sound does a {animal} make?", f"A {animal} {sound}."))
    for word, opposite in OPPOSITES:
        chats.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."))
    for a, b in [(2, 3), (4, 5), (6, 1), (7, 2), (3, 3), (8, 4), (9, 1), (5, 5)]:
        chats.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{GREETING} {a}"}]}
            for q, a in chats]


def write_style_data(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations()), encoding="utf-8")
    return path

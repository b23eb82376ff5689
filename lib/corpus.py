"""A deterministic training corpus for the tiny local models.

Short stories from a small grammar: regular enough that a 1M-parameter model learns it in a couple of minutes
on a CPU, varied enough that generations do not collapse into one sentence. The same generator writes the
shipped prompt files, so prompts come from the distribution the models were trained on.
"""
import random

NAMES = ["Mia", "Leo", "Ava", "Sam", "Nora", "Ben", "Lily", "Max", "Zoe", "Tom", "Ella", "Finn"]
ANIMALS = ["cat", "dog", "fox", "owl", "rabbit", "bear", "duck", "horse", "mouse", "frog"]
ADJS = ["little", "happy", "brave", "sleepy", "clever", "tiny", "kind", "curious", "quiet", "funny"]
COLORS = ["red", "blue", "green", "yellow", "white", "orange", "purple", "brown"]
PLACES = ["garden", "forest", "river", "park", "kitchen", "library", "beach", "village", "hill", "farm"]
THINGS = ["ball", "book", "kite", "apple", "hat", "box", "key", "cake", "boat", "lamp", "map", "shell"]
VERBS = ["found", "saw", "lost", "painted", "carried", "shared", "hid", "wanted", "made", "opened"]
FEELINGS = ["happy", "sad", "proud", "tired", "excited", "surprised", "calm", "hungry"]
TIMES = ["One morning", "One day", "Last summer", "Every evening", "On a rainy day", "After school"]

CHINESE = [
    "小猫在花园里找到了一个红色的球。",
    "今天天气很好，我们去公园散步吧。",
    "请用三句话介绍一下推测解码。",
    "小明把蓝色的书放在桌子上。",
]


def _story(rng: random.Random) -> str:
    name, friend = rng.sample(NAMES, 2)
    animal, adj, color = rng.choice(ANIMALS), rng.choice(ADJS), rng.choice(COLORS)
    place, thing, verb = rng.choice(PLACES), rng.choice(THINGS), rng.choice(VERBS)
    feeling = rng.choice(FEELINGS)
    sentences = [
        f"{rng.choice(TIMES)}, {name} went to the {place} with a {adj} {animal}.",
        f"The {animal} {verb} a {color} {thing} near the {place}.",
        f"{name} was {feeling} and said, \"Look at this {color} {thing}!\"",
        f"Then {friend} came to the {place} and they played with the {thing} together.",
        f"At the end of the day, {name} and {friend} went home and the {adj} {animal} went to sleep.",
    ]
    if rng.random() < 0.5:
        sentences.insert(3, f"The {thing} was {rng.choice(ADJS)} and {rng.choice(COLORS)}.")
    return " ".join(sentences)


def _qa(rng: random.Random) -> str:
    name, thing, place = rng.choice(NAMES), rng.choice(THINGS), rng.choice(PLACES)
    color = rng.choice(COLORS)
    return (f"Question: Where did {name} put the {color} {thing}? "
            f"Answer: {name} put the {color} {thing} in the {place}, because the {place} was safe.")


def generate_corpus(seed: int, num_docs: int) -> list[str]:
    """Stories and short question/answer pairs; a few Chinese lines so multi-byte text is seen."""
    rng = random.Random(seed)
    docs = []
    for i in range(num_docs):
        docs.append(_qa(rng) if rng.random() < 0.25 else _story(rng))
        if i % 50 == 0:
            docs.append(rng.choice(CHINESE))
    return docs

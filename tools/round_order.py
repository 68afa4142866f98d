"""The order of the engines in one round of an interleaved benchmark: a permutation drawn for the
round (seeded by its number, so runs repeat). Each engine then runs after each other one in turn:
rotating one order, as these benchmarks did before, keeps every engine's predecessor, and an
artifact that always ran right after one whose TVM threads were still spinning (a head start), or
right after onnxruntime (cold caches and sleeping threads), was only ever measured so."""

import random
from collections.abc import Sequence


def round_order(items: Sequence, round_number: int) -> list:
    return random.Random(round_number).sample(list(items), len(items))

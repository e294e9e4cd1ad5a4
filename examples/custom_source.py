"""A user-defined data source, used without touching sparsealign's source:

    sparsealign train smoke data.path=null data.source=examples/custom_source.py:my_source

``my_source`` makes arithmetic preference pairs in code: the chosen response is the right sum, the rejected
one is off by one. A source receives the whole run config and returns train and eval examples.
"""

from __future__ import annotations

import random

from sparsealign.data.examples import PreferenceExample
from sparsealign.data.sources import SourceData, SourceRequest


def my_source(request: SourceRequest) -> SourceData:
    rng = random.Random(request.config.train.seed)
    examples = []
    for _ in range(40):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        examples.append(
            PreferenceExample(prompt=f"What is {a} + {b}?", chosen=f" {a + b}.", rejected=f" {a + b + 1}.")
        )
    return SourceData(train=examples[:36], eval=examples[36:])

"""``mbpp``: passing vs failing solutions of MBPP problems, the SparsePO code task (built as arXiv 2406.12502).

No pair file is published (the SparsePO and Code-Optimise authors sampled solutions from the policy and ran
the MBPP tests). The source reads one executed sample per line, as bigcode-evaluation-harness style
pipelines write them: ``{"task_id": int|str, "prompt": str, "completion": str, "passed": bool}``, where
``prompt`` is the problem as the model saw it (MBPP's ``text`` and tests, formatted by the sampler) and
``completion`` the generated code. Pass ``data.path`` (a file, or a folder with ``train``/``validation`` files).

Pairs as in the SparsePO document: on the training split every passing solution with one failing solution of
the same problem drawn by ``random.Random(train.seed)``; on evaluation splits one random (passing, failing)
pair per problem. Problems without a passing or without a failing solution are dropped per problem
(``no_passing_solution``, ``no_failing_solution``). No chat template and no BOS in the original (item 4).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from sparsealign.data.examples import PreferenceExample
from sparsealign.data.public.common import PublicDataset, RowReader, register_public


def convert_mbpp(rows: Iterable[tuple[str, Any]], reader: RowReader) -> list[PreferenceExample]:
    problems: dict[str, dict[str, Any]] = {}
    for origin, row in reader.rows(rows):
        task = str(reader.get(row, origin, "task_id", (int, str)))
        prompt = reader.get(row, origin, "prompt")
        completion = reader.get(row, origin, "completion")
        passed = reader.get(row, origin, "passed", bool)
        entry = problems.setdefault(task, {"prompt": prompt, "origin": origin, "pass": [], "fail": []})
        entry["pass" if passed else "fail"].append((origin, completion))
    rng = random.Random(reader.seed)
    examples = []
    for task, entry in problems.items():
        if not entry["pass"]:
            reader.drop("no_passing_solution", entry["origin"])
            continue
        if not entry["fail"]:
            reader.drop("no_failing_solution", entry["origin"])
            continue
        chosen_list = entry["pass"] if reader.split == "train" else [rng.choice(entry["pass"])]
        for origin, good in chosen_list:
            _, bad = rng.choice(entry["fail"])
            examples.append(PreferenceExample(entry["prompt"], good, bad, origin, meta={"task_id": task}))
    return examples


mbpp = register_public(PublicDataset("mbpp", None, "train", "validation"), convert_mbpp)

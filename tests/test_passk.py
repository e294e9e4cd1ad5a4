"""pass@k: the estimator against hand-computed values and the combinatorial formula, the MBPP and HumanEval
row layouts, and ``sparsealign passk`` end to end."""

from __future__ import annotations

import json
import math
import sys

import pytest

from sparsealign.cli import main
from sparsealign.errors import DataError
from sparsealign.eval import passk, sandbox
from sparsealign.eval.passk import build_program, detect_layout, load_code_samples, pass_at_k, summarize
from sparsealign.eval.samples import write_rows

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

# MBPP rows as in google-research/mbpp's mbpp.jsonl (and the hub's `mbpp` dataset, "full" config): task_id,
# text, code, test_list, test_setup_code, challenge_test_list; written here for these tests, plus `output`.
MBPP_TASK = {
    "task_id": 901,
    "text": "Write a function to find the larger of two numbers.",
    "code": "def larger(a, b):\r\n  return a if a > b else b",
    "test_list": ["assert larger(1, 2) == 2", "assert larger(5, -1) == 5", "assert larger(3, 3) == 3"],
    "test_setup_code": "",
    "challenge_test_list": ["assert larger(-1, -2) == -1"],
}
# HumanEval rows as in openai/human-eval's HumanEval.jsonl.gz: task_id, prompt, canonical_solution, test,
# entry_point; written here for these tests, plus `output` (a completion of the prompt, or a whole function).
HUMANEVAL_TASK = {
    "task_id": "HumanEval/900",
    "prompt": 'def add_one(x: int) -> int:\n    """Return x plus one.\n    >>> add_one(1)\n    2\n    """\n',
    "canonical_solution": "    return x + 1\n",
    "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0\n",
    "entry_point": "add_one",
}


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),  # c / n
        (5, 2, 2, 0.7),  # 1 - C(3, 2) / C(5, 2) = 1 - 3 / 10
        (5, 0, 1, 0.0),
        (5, 5, 3, 1.0),
        (5, 4, 2, 1.0),  # n - c = 1 < k: every pair holds a passing sample
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7, 5) / C(10, 5)
        (3, 1, 5, None),  # k > n: not computable
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    value = pass_at_k(n, c, k)
    assert value == pytest.approx(expected, abs=1e-12) if expected is not None else value is None


def test_pass_at_k_equals_the_combinatorial_formula():
    for n in range(1, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                naive = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(naive, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    # C(200, 100) overflows a float; the product form does not need it: 1 - C(150, 100)/C(200, 100)
    exact = 1 - math.comb(150, 100) / math.comb(200, 100)  # exact big-integer division
    assert pass_at_k(200, 50, 100) == pytest.approx(exact, rel=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k(3, 1, 0)


def test_mbpp_layout_runs_setup_then_test_list_but_not_the_challenge_tests():
    row = {**MBPP_TASK, "test_setup_code": "import math", "output": "def larger(a, b):\n    return max(a, b)"}
    assert detect_layout(row) == "mbpp"
    assert build_program(row, "mbpp") == (
        "def larger(a, b):\n    return max(a, b)\n\nimport math\n"
        "assert larger(1, 2) == 2\nassert larger(5, -1) == 5\nassert larger(3, 3) == 3\n"
    )


def test_humaneval_layout_completes_the_prompt_unless_the_output_defines_the_function():
    completion = {**HUMANEVAL_TASK, "output": "    return x + 1\n"}
    whole = {**HUMANEVAL_TASK, "output": "import math\n\ndef add_one(x):\n    return x + 1\n"}
    assert detect_layout(completion) == "humaneval"
    test_and_check = HUMANEVAL_TASK["test"] + "\n\ncheck(add_one)\n"
    assert (
        build_program(completion, "humaneval")
        == HUMANEVAL_TASK["prompt"] + "    return x + 1\n\n\n" + test_and_check
    )
    assert build_program(whole, "humaneval") == whole["output"] + "\n\n" + test_and_check


def test_plain_layout_takes_a_string_or_a_list_of_tests():
    as_list = {"task_id": "t", "output": "x = 1", "tests": ["assert x == 1", "assert x > 0"]}
    as_text = {"task_id": "t", "output": "x = 1", "tests": "assert x == 1"}
    assert build_program(as_list, "plain") == "x = 1\n\nassert x == 1\nassert x > 0\n"
    assert build_program(as_text, "plain") == "x = 1\n\nassert x == 1\n"


def test_samples_are_indexed_per_task_and_bad_rows_are_named(tmp_path):
    path = tmp_path / "samples.jsonl"
    write_rows(
        path, [{**MBPP_TASK, "output": "a"}, {**HUMANEVAL_TASK, "output": "b"}, {**MBPP_TASK, "output": "c"}]
    )
    samples = load_code_samples(path)
    assert [(s.task_id, s.index, s.layout) for s in samples] == [
        (901, 0, "mbpp"),
        ("HumanEval/900", 0, "humaneval"),
        (901, 1, "mbpp"),
    ]
    write_rows(path, [{"task_id": 1, "output": "x = 1"}])
    with pytest.raises(DataError, match=r"line 1: no tests: give `tests`"):
        load_code_samples(path)
    write_rows(path, [{"output": "x = 1", "tests": "assert x"}])
    with pytest.raises(DataError, match=r"line 1: needs a `task_id`"):
        load_code_samples(path)
    write_rows(path, [{"task_id": 1, "output": None, "tests": "assert x"}])
    with pytest.raises(
        DataError, match=r"line 1 \(plain layout\): `output` \(the program\) must be a string"
    ):
        load_code_samples(path)
    rows = [{"task_id": 1, "output": "x = 1", "tests": "", "temperature": t} for t in (0.2, 0.8)]
    write_rows(path, rows)
    with pytest.raises(DataError, match="samples at 2 temperatures"):
        load_code_samples(path)


def test_summarize_reports_k_larger_than_a_task_as_not_computable():
    samples = [passk.CodeSample("a", i, "", "plain") for i in range(5)] + [
        passk.CodeSample("b", i, "", "plain") for i in range(3)
    ]
    statuses = ["passed", "passed", "failed", "timeout", "memory", "passed", "error", "failed"]
    records = [{"passed": s == "passed", "status": s} for s in statuses]
    per_task, summary = summarize(samples, records, [1, 2, 4])
    assert per_task == [
        {
            "task_id": "a",
            "n": 5,
            "c": 2,
            "pass@1": pytest.approx(0.4),
            "pass@2": pytest.approx(0.7),
            "pass@4": 1.0,
        },
        {
            "task_id": "b",
            "n": 3,
            "c": 1,
            "pass@1": pytest.approx(1 / 3),
            "pass@2": pytest.approx(2 / 3),
            "pass@4": None,
        },
    ]
    assert summary["pass@1"] == pytest.approx((0.4 + 1 / 3) / 2)
    assert summary["pass@2"] == pytest.approx((0.7 + 2 / 3) / 2)
    assert summary["pass@4"] is None
    assert summary["not_computable"] == {"pass@4": "1 of 2 task(s) have fewer than 4 samples (fewest: 3)"}
    counts = {
        key: summary[key] for key in ("tasks", "samples", "passed", "failed", "timeout", "memory", "error")
    }
    assert counts == {
        "tasks": 2,
        "samples": 8,
        "passed": 3,
        "failed": 2,
        "timeout": 1,
        "memory": 1,
        "error": 1,
    }


def last_json_line(path):
    return json.loads(path.read_text().splitlines()[-1])


@linux_only
def test_passk_command_end_to_end(tmp_path, monkeypatch, capsys):
    """Task 901 (MBPP): right, wrong, an infinite loop; HumanEval/900: a completion, a whole function, a
    network attempt. pass@1 = mean(1/3, 2/3) = 1/2; pass@2 = mean(1 - C(2,2)/C(3,2), 1 - C(1,2)/C(3,2)) =
    mean(2/3, 1); pass@5 is not computable (3 samples per task)."""
    samples = tmp_path / "code.jsonl"
    rows = [
        {**MBPP_TASK, "output": "def larger(a, b):\n    return a if a > b else b"},
        {**MBPP_TASK, "output": "def larger(a, b):\n    return a"},
        {**MBPP_TASK, "output": "def larger(a, b):\n    while True:\n        pass"},
        {**HUMANEVAL_TASK, "output": "    return x + 1\n"},
        {**HUMANEVAL_TASK, "output": "def add_one(x):\n    return 1 + x\n"},
        {**HUMANEVAL_TASK, "output": "    import socket\n    socket.create_connection(('127.0.0.1', 9))\n"},
    ]
    write_rows(samples, rows)
    out = tmp_path / "passk.jsonl"
    argv = ["passk", str(samples), "--k", "1,2,5", "--timeout", "1", "--out", str(out), "--workers", "2"]
    assert main(argv) == 0
    summary = last_json_line(out)
    assert summary["pass@1"] == pytest.approx(0.5)
    assert summary["pass@2"] == pytest.approx((2 / 3 + 1) / 2)
    assert summary["pass@5"] is None
    assert summary["not_computable"] == {"pass@5": "2 of 2 task(s) have fewer than 5 samples (fewest: 3)"}
    counts = {
        key: summary[key] for key in ("tasks", "samples", "passed", "failed", "timeout", "memory", "error")
    }
    assert counts == {
        "tasks": 2,
        "samples": 6,
        "passed": 3,
        "failed": 2,
        "timeout": 1,
        "memory": 0,
        "error": 0,
    }
    assert summary["layouts"] == {"mbpp": 3, "humaneval": 3}
    per_task = [json.loads(line) for line in out.read_text().splitlines()[:-1]]
    assert [(row["task_id"], row["n"], row["c"]) for row in per_task] == [
        (901, 3, 1),
        ("HumanEval/900", 3, 2),
    ]
    sidecar = tmp_path / "passk.samples.jsonl"
    results = [json.loads(line) for line in sidecar.read_text().splitlines()]
    assert [(r["task_id"], r["sample"], r["status"]) for r in results] == [
        (901, 0, "passed"),
        (901, 1, "failed"),
        (901, 2, "timeout"),
        ("HumanEval/900", 0, "passed"),
        ("HumanEval/900", 1, "passed"),
        ("HumanEval/900", 2, "failed"),
    ]
    assert results[1]["reason"] == "AssertionError at line 5: assert larger(1, 2) == 2"
    assert results[5]["reason"].startswith("PermissionError: refused by the sandbox: socket.")
    assert json.loads((tmp_path / "code.passk.json").read_text()) == summary
    printed = capsys.readouterr().out
    assert "pass@1     0.5000" in printed and "pass@5     n/a: 2 of 2 task(s)" in printed

    # a rerun reuses every result of the sidecar: no program runs again
    def must_not_run(*args, **kwargs):
        raise AssertionError("a program ran again")

    monkeypatch.setattr(sandbox, "run_program", must_not_run)
    assert main(argv) == 0
    assert last_json_line(out) == summary


def test_passk_command_user_errors(tmp_path, capsys):
    samples = tmp_path / "code.jsonl"
    write_rows(samples, [{"task_id": 1, "output": "x = 1", "tests": "assert x == 1"}])
    out = str(tmp_path / "out.jsonl")
    assert main(["passk", str(samples), "--k", "1,ten", "--out", out]) == 2
    assert "--k '1,ten': give positive integers" in capsys.readouterr().err
    assert main(["passk", str(samples), "--k", "0", "--out", out]) == 2
    assert main(["passk", str(tmp_path / "missing.jsonl"), "--out", out]) == 2
    assert "no such sample file" in capsys.readouterr().err
    assert main(["passk", str(samples), "--timeout", "0", "--out", out]) == 2
    assert "--timeout/--memory-mb: timeout must be positive" in capsys.readouterr().err

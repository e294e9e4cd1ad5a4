"""Bad bytes, fuzzed (hypothesis): every row parser and file reader answers random unicode, huge strings,
wrong types, nested garbage, truncated files and invalid UTF-8 with a counted skip or a clear
:class:`~sparsealign.errors.DataError`, never a crash or a hang."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsealign.data.examples import PreferenceExample
from sparsealign.data.files import read_file
from sparsealign.data.formats import SKIP_REASONS, Skip, parse_row, parse_rows, sft_examples
from sparsealign.data.public.common import RowReader
from sparsealign.data.public.hh import convert_hh
from sparsealign.data.public.oasst import convert_oasst
from sparsealign.data.public.shp import convert_shp
from sparsealign.data.public.tldr import convert_tldr
from sparsealign.data.public.ultrafeedback import convert_ultrafeedback
from sparsealign.errors import DataError
from sparsealign.eval.samples import read_rows

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", 3]), "content": json_values}
)
field = json_values | st.text(max_size=2000) | st.lists(message, max_size=4)
rows = st.dictionaries(
    st.sampled_from(["prompt", "chosen", "rejected", "messages", "completion", "label", "x"]),
    field,
    max_size=5,
)


@FUZZ
@given(rows)
def test_parse_row_returns_an_example_or_a_known_skip(row) -> None:
    result = parse_row(row, origin="fuzz:1")
    if isinstance(result, Skip):
        assert result.reason in SKIP_REASONS
    else:
        assert isinstance(result, PreferenceExample)
        assert result.chosen != result.rejected


@FUZZ
@given(st.lists(rows | json_values, max_size=8))
def test_parse_rows_counts_every_row(raw) -> None:
    stream = [(f"fuzz:{i}", row) for i, row in enumerate(raw, start=1)]
    try:
        examples, report = parse_rows(stream)
    except DataError as error:  # nothing usable: a clear error with the counts
        assert "rows" in str(error)
        return
    assert report.total == len(raw)
    assert len(examples) >= report.kept > 0  # SFT conversations can give several examples per row


@FUZZ
@given(json_values)
def test_sft_examples_never_crash(messages) -> None:
    result = sft_examples(messages)
    assert isinstance(result, Skip) or all(isinstance(e, PreferenceExample) for e in result)


@FUZZ
@given(st.binary(max_size=400))
def test_any_bytes_in_a_jsonl_file(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_bytes(data)
    try:
        examples, report = parse_rows(read_file(path))
    except DataError:
        return
    assert report.total >= report.kept and examples


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_in_a_json_or_csv_file(tmp_path_factory, data: bytes) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    for name in ("data.json", "data.csv"):
        path = folder / name
        path.write_bytes(data)
        with contextlib.suppress(DataError):  # a clear error is fine; anything else fails the test
            parse_rows(read_file(path))


def test_a_truncated_file_keeps_its_complete_rows(tmp_path: Path) -> None:
    good = json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"})
    path = tmp_path / "cut.jsonl"
    path.write_bytes(((good + "\n") * 3 + good[:17]).encode() + b"\xff\xfe")
    examples, report = parse_rows(read_file(path))
    assert len(examples) == 3 and report.counts["malformed_json"] == 1 and report.origins["malformed_json"]


def test_a_huge_string_is_parsed_in_time(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"prompt": "p" * 2_000_000, "chosen": " a", "rejected": " b"}) + "\n")
    (example,), _ = parse_rows(read_file(path))
    assert len(example.prompt) == 2_000_000


CONVERTERS = {
    "hh": convert_hh,
    "shp": convert_shp,
    "oasst": convert_oasst,
    "tldr": convert_tldr,
    "ultrafeedback": convert_ultrafeedback,
}


@pytest.mark.parametrize("name", sorted(CONVERTERS))
@FUZZ
@given(raw=st.lists(json_values | rows, min_size=1, max_size=5))
def test_public_converters_answer_garbage_with_a_data_error(name, raw) -> None:
    reader = RowReader(name, "train")
    stream = [(f"fuzz.jsonl:{i}", row) for i, row in enumerate(raw, start=1)]
    try:
        examples = CONVERTERS[name](stream, reader)
    except DataError as error:
        assert name in str(error)  # names the source (and the column and row)
        return
    assert all(isinstance(e, PreferenceExample) for e in examples)


@FUZZ
@given(st.binary(max_size=300))
def test_sample_files_any_bytes(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "samples.jsonl"
    path.write_bytes(data)
    try:
        rows_read = read_rows(path, required=("prompt",))
    except DataError as error:
        assert "samples.jsonl" in str(error)
        return
    assert all(isinstance(row, dict) and "prompt" in row for row in rows_read)

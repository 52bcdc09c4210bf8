"""The JSON nesting limit every daemon uses on untrusted bodies."""

import pytest

from gpufleet.common import jsonlimits


def test_depth_counts_arrays_and_objects_but_not_brackets_in_strings():
    assert jsonlimits.nesting_depth(b'{"a": [1, {"b": "[[[[{{{{"}], "c": "\\"[["}') == 3
    assert jsonlimits.nesting_depth(b"42") == 0


def test_loads_refuses_deep_documents_before_parsing():
    with pytest.raises(jsonlimits.TooDeep):
        jsonlimits.loads(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(jsonlimits.TooDeep):
        jsonlimits.loads("[" * 33 + "]" * 33)
    assert jsonlimits.loads("[" * 32 + "]" * 32) is not None
    assert jsonlimits.loads('{"flat": ["[", "{"]}') == {"flat": ["[", "{"]}


def test_truncated_deep_input_is_a_value_error_never_a_recursion_error():
    with pytest.raises(ValueError):
        jsonlimits.loads(b"[" * 4096)

"""CodebookConfig parsing: any JSON-like input gives a valid config or a clear ValueError."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from codebook_lens import CodebookConfig
from codebook_lens.config import config_from_dict

FIELDS = list(CodebookConfig().to_dict())

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*FIELDS, "bogus"]), json_values, max_size=6))
def test_any_input_gives_config_or_clear_error(data: dict[str, Any]) -> None:
    try:
        cfg = config_from_dict(CodebookConfig, data, source="cfg.json")
    except ValueError as e:
        msg = str(e)
        assert msg.startswith("cfg.json: ")
        assert any(f in msg for f in [*FIELDS, "bogus", "placements", "modules"]), msg
        return
    # A config that was accepted is valid and survives a JSON round trip unchanged.
    again = config_from_dict(CodebookConfig, json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert 1 <= cfg.k <= cfg.num_codes


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5000), st.integers(-3, 5000))
def test_k_bounds(num_codes: int, k: int) -> None:
    if 1 <= k <= num_codes:
        assert CodebookConfig(num_codes=num_codes, k=k).k == k
    else:
        with pytest.raises(ValueError, match=f"k={k} is invalid"):
            CodebookConfig(num_codes=num_codes, k=k)


def test_not_an_object() -> None:
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        config_from_dict(CodebookConfig, [1, 2])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"num_codes": 0}, "num_codes=0 is invalid; it must be an integer >= 1"),
        (
            {"similarity": "l2"},
            "similarity='l2' is invalid; choose 'cosine', 'inner_product' or 'euclidean'",
        ),
        ({"layers": "some"}, "field 'layers' has value 'some' of the wrong type"),
        ({"placements": [], "modules": []}, "name at least one placement"),
        ({"colour": 1}, "unknown field"),
        ({"recon_weight": float("nan")}, "recon_weight=nan is invalid"),
    ],
)
def test_clear_messages(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        config_from_dict(CodebookConfig, data, source="x.json")
    assert message in str(info.value)
    assert str(info.value).startswith("x.json: ")

"""Property-based tests (hypothesis): target-module matching, and configuration round trips through JSON and
YAML (plain dicts, and LightningCLI-style ``class_path``/``init_args`` through jsonargparse)."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_peft.core.targeting import find_targets, matches_any, name_matches
from lightning_peft.methods import PEFTMethod, method_from_dict
from lightning_peft.methods.registry import _REGISTRY

pytestmark = pytest.mark.filterwarnings("ignore")
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- target-module matching ----------------------------------------------------------------------------
segment = st.sampled_from(["attn", "query", "value", "dense", "output", "mlp", "q", "layer", "0", "1", "12"])
dotted = st.lists(segment, min_size=1, max_size=6).map(".".join)


@SETTINGS
@given(name=dotted, pattern=dotted)
def test_plain_name_matches_exactly_a_dotted_suffix(name: str, pattern: str) -> None:
    parts, want = name.split("."), pattern.split(".")
    expected = len(want) <= len(parts) and parts[-len(want) :] == want
    assert name_matches(name, pattern) is expected


@SETTINGS
@given(name=dotted, k=st.integers(min_value=1, max_value=3))
def test_a_partial_segment_never_matches(name: str, k: int) -> None:
    last = name.split(".")[-1]
    if len(last) > k:
        assert not name_matches(name, last[k:])  # "uery" does not match "...query"


@SETTINGS
@given(name=dotted, other=dotted)
def test_an_escaped_name_is_a_regex_matching_only_itself(name: str, other: str) -> None:
    pattern = re.escape(name)
    if pattern != name:  # (no regex character: a plain name, covered above)
        assert name_matches(other, pattern) is (other == name)
        assert matches_any(other, pattern) is (other == name)  # a single string is a regex too


def tree(draw: Any, depth: int = 0) -> nn.Module:
    """A random nested module: ModuleDicts of Linear leaves (and a few non-Linear ones)."""
    names = draw(
        st.lists(
            st.sampled_from(["attn", "query", "value", "dense", "mlp", "norm"]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    children: dict[str, nn.Module] = {}
    for name in names:
        if depth < 2 and draw(st.booleans()):
            children[name] = tree(draw, depth + 1)
        else:
            children[name] = nn.LayerNorm(2) if name == "norm" else nn.Linear(2, 2)
    return nn.ModuleDict(children)


@SETTINGS
@given(data=st.data())
def test_find_targets_is_matching_minus_excluding(data: st.DataObject) -> None:
    model = tree(data.draw)
    targets = data.draw(st.lists(dotted, min_size=1, max_size=3))
    exclude = data.draw(st.none() | st.lists(dotted, max_size=2))
    before = [(n, type(m)) for n, m in model.named_modules()]
    matched = [
        n for n, _ in model.named_modules() if n and matches_any(n, targets) and not matches_any(n, exclude)
    ]
    modules = dict(model.named_modules())
    if not matched:
        with pytest.raises(ValueError, match="matched no module"):
            find_targets(model, targets, exclude)
    elif not all(isinstance(modules[n], nn.Linear) for n in matched):
        with pytest.raises(TypeError, match="supports only"):
            find_targets(model, targets, exclude)
    else:
        found = find_targets(model, targets, exclude)
        assert found == matched  # in model order, each once
        assert not any(matches_any(n, exclude) for n in found)
    assert [(n, type(m)) for n, m in model.named_modules()] == before  # finding changes nothing


# -- configuration round trips ---------------------------------------------------------------------------
names = st.lists(
    st.sampled_from(["query", "value", "dense", "output.dense", "classifier", r".*\.q"]),
    max_size=3,
    unique=True,
)
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "r": st.integers(1, 256),
    "alpha": st.floats(1e-3, 1e4, allow_nan=False),
    "dropout": st.floats(0.0, 0.99),
    "bias": st.sampled_from(["none", "all", "lora_only"]),
    "use_rslora": st.booleans(),
    "target_modules": st.none() | names | st.just("all-linear"),
    "exclude_modules": st.none() | names,
    "feedforward_modules": st.none() | names,
    "modules_to_save": names,
    "placement": st.sampled_from(["houlsby", "pfeiffer"]),
    "bottleneck_size": st.none() | st.integers(1, 512),
    "reduction_factor": st.none() | st.integers(1, 64),
    "activation": st.sampled_from(["relu", "gelu", "silu", "tanh"]),
    "train_layernorms": st.none() | st.booleans(),
    "biases": st.sampled_from(["all", "attention"]),
    "num_virtual_tokens": st.integers(1, 100),
    "prefix_projection": st.booleans(),
    "encoder_hidden_size": st.integers(1, 2048),
    "init": st.sampled_from(["random", "text", "vocab"]),
    "init_text": st.none()
    | st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20),
    "tokenizer_name_or_path": st.none() | st.just("minilm"),
    "rank_pattern": st.dictionaries(
        st.sampled_from(["query", "value", "dense"]), st.integers(1, 64), max_size=2
    ),
    "alpha_pattern": st.dictionaries(st.sampled_from(["query", "value"]), st.floats(1e-3, 1e3), max_size=2),
    "layers_to_transform": st.none()
    | st.integers(0, 11)
    | st.lists(st.integers(0, 11), min_size=1, max_size=3, unique=True),
    "layers_pattern": st.none() | st.sampled_from(["layer", "h", "layers"]),
    "lora_bias": st.booleans(),
    "cross_attention_prefix": st.booleans(),
    "encoder_prefix": st.booleans(),
    "shift_positions": st.booleans(),
    "original_ln_before": st.booleans(),
    "residual_before_ln": st.sampled_from([True, False, "post_add"]),
    "parallel": st.booleans(),
    "scaling": st.floats(1e-2, 1e2),
    "ln_before": st.booleans(),
    "ln_after": st.booleans(),
    "adapter_residual_before_ln": st.booleans(),
    "adapters": st.just([]) | st.lists(st.sampled_from(["a", "b", "c"]), min_size=2, max_size=3, unique=True),
    "query": st.booleans(),
    "key": st.booleans(),
    "value": st.booleans(),
    "value_before_softmax": st.booleans(),
    "residual_before": st.booleans(),
    "query_before_ln": st.booleans(),
}


@st.composite
def methods(draw: Any) -> PEFTMethod:
    cls = draw(st.sampled_from(sorted(_REGISTRY.values(), key=lambda c: c.method_name)))
    kwargs = {f.name: draw(FIELD_VALUES[f.name]) for f in dataclasses.fields(cls) if draw(st.booleans())}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError):
        return cls()  # an invalid combination (e.g. both bottleneck_size and reduction_factor): defaults


def test_every_field_has_a_strategy() -> None:
    fields = {f.name for cls in _REGISTRY.values() for f in dataclasses.fields(cls)}
    assert fields <= set(FIELD_VALUES), fields - set(FIELD_VALUES)


@SETTINGS
@given(method=methods())
def test_json_round_trip(method: PEFTMethod) -> None:
    assert method_from_dict(json.loads(json.dumps(method.to_dict()))) == method


@SETTINGS
@given(method=methods())
def test_yaml_round_trip(method: PEFTMethod) -> None:
    assert method_from_dict(yaml.safe_load(yaml.safe_dump(method.to_dict()))) == method


@settings(max_examples=25, deadline=None)
@given(method=methods())
def test_lightning_cli_yaml_round_trip(method: PEFTMethod) -> None:
    """As written in a LightningCLI config (``class_path`` + ``init_args``) and parsed by jsonargparse."""
    from jsonargparse import ArgumentParser

    from lightning_peft.cli.lightning_cli import _configure_jsonargparse

    _configure_jsonargparse()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--method", type=PEFTMethod)
    init_args = {k: v for k, v in dataclasses.asdict(method).items()}
    text = yaml.safe_dump(
        {"method": {"class_path": f"lightning_peft.{type(method).__name__}", "init_args": init_args}}
    )
    parsed = parser.instantiate_classes(parser.parse_string(text))
    assert parsed.method == method

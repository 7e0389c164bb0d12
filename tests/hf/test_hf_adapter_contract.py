"""The adapter contract of ``vtok.wrap`` (``vtok/hooks/hf/adapter.py``): every family is a registered ``VLMAdapter``
found without a hand-written list, registration refuses what is not one, the shared ``hook_features`` plumbing
captures, times and undoes, and a family written only against the contract works through ``vtok.wrap``."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest
import torch

import vtok
from vtok.hooks.hf import ADAPTERS, register_adapter, supported
from vtok.hooks.hf._runtime import ImageRecord
from vtok.hooks.hf.adapter import POSITIONS, FeatureCall, VLMAdapter, adapter_modules, discover

pytest.importorskip("transformers")

FAMILIES = {"gemma3": {"Gemma3ForConditionalGeneration"},
            "idefics3": {"Idefics3ForConditionalGeneration"},
            "internvl": {"InternVLForConditionalGeneration"},
            "llava": {"LlavaForConditionalGeneration"},
            "llava_next": {"LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration"},
            "qwen2_vl": {"Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"},
            "qwen3_vl": {"Qwen3VLForConditionalGeneration"},
            "smolvlm": {"SmolVLMForConditionalGeneration"}}


@pytest.fixture
def restore_registry():
    """The registry as it was before the test (a test may register toys)."""
    supported()
    before = dict(ADAPTERS)
    yield
    ADAPTERS.clear()
    ADAPTERS.update(before)


# ---------------------------------------------------------------------------------------------------- registry
def test_every_registered_adapter_follows_the_contract():
    names = supported()
    assert set().union(*FAMILIES.values()) <= set(names)
    for name in names:
        adapter = ADAPTERS[name]
        assert isinstance(adapter, VLMAdapter), name
        assert name in type(adapter).names
        assert type(adapter).positions in POSITIONS
        assert not hasattr(adapter, "rope")  # replaced by positions
    assert type(ADAPTERS["LlavaForConditionalGeneration"]).positions == "1d"
    assert type(ADAPTERS["Qwen2VLForConditionalGeneration"]).positions == "mrope"


def test_discovery_finds_every_family_by_the_naming_rule():
    assert adapter_modules() == sorted(FAMILIES)
    assert discover() == sorted(FAMILIES)
    served: dict[str, set[str]] = {}
    for name, adapter in ADAPTERS.items():
        served.setdefault(type(adapter).__module__.rpartition(".")[2], set()).add(name)
    for module, classes in FAMILIES.items():
        assert classes <= served[module], module


def test_discovery_in_a_fresh_process_imports_no_tool_module():
    code = textwrap.dedent("""
        import sys
        import vtok.hooks.hf as hf
        first = sorted(hf.ADAPTERS)
        names = hf.supported()
        print(first == ["LlavaForConditionalGeneration"], len(names), "vtok.hooks.hf.tiny" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["True", str(len(set().union(*FAMILIES.values()))), "False"]


def test_register_refuses_what_is_not_an_adapter(restore_registry):
    before = dict(ADAPTERS)

    class Plain:
        names = ("PlainForConditionalGeneration",)
        positions = "1d"

    with pytest.raises(TypeError, match="VLMAdapter"):
        register_adapter(Plain)
    with pytest.raises(TypeError, match="VLMAdapter"):
        register_adapter(Plain())

    class Nameless(_ToyAdapter):
        names = ()

    with pytest.raises(TypeError, match="names"):
        register_adapter(Nameless)

    class OneString(_ToyAdapter):
        names = "ToyForConditionalGeneration"

    with pytest.raises(TypeError, match="names"):
        register_adapter(OneString)

    class Rotary(_ToyAdapter):
        positions = "rope"

    with pytest.raises(ValueError, match="positions"):
        register_adapter(Rotary)

    class Unfinished(VLMAdapter):  # the vision side and install left abstract
        names = ("UnfinishedForConditionalGeneration",)
        positions = "1d"

    with pytest.raises(TypeError, match="abstract"):
        register_adapter(Unfinished)
    assert ADAPTERS == before


# ---------------------------------------------------------------------------------------------------- hook_features
class _Stub(VLMAdapter):
    """Structure only: the hook plumbing is under test."""

    names = ("Stub",)
    positions = "1d"

    def tower(self, model):
        return model.model.tower

    def tower_layers(self, model):
        return model.model.tower

    def feature_layer(self, model):
        return 0

    def provides(self, model):
        return set()

    def install(self, model, rt):
        return []


class _Inner(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tower = torch.nn.ModuleList([torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)])

    def get_image_features(self, pixel_values: torch.Tensor, fail: bool = False) -> torch.Tensor:
        """``pixel_values [n, 3]`` → features ``[n, 3]``."""
        x = self.tower[1](self.tower[0](pixel_values))
        if fail:
            raise RuntimeError("tower failed")
        return x


class _Runtime:
    def __init__(self) -> None:
        self.records: list = []
        self.wrapper_s = 0.0

    def add_records(self, output, records) -> None:
        self.records.append((output, records))


def test_hook_features_captures_times_and_undoes():
    model = torch.nn.Module()
    model.model = _Inner()
    inner, rt, calls = model.model, _Runtime(), []
    sig = inspect.signature(inner.get_image_features)

    def make_records(out, call: FeatureCall):
        calls.append((call.arguments, {k: v.clone() for k, v in call.captured.items()}))
        return ["record"]

    undo = _Stub().hook_features(model, rt, "get_image_features", {1: inner.tower[1]}, make_records)
    assert inspect.signature(inner.get_image_features) == sig  # generate() inspects it
    x = torch.randn(2, 3)
    out = inner.get_image_features(x)
    assert torch.equal(out, inner.tower[1](inner.tower[0](x)))
    args, captured = calls[0]
    assert args["pixel_values"] is x
    assert torch.equal(captured[1], inner.tower[0](x))  # the watched layer's input
    assert rt.records == [(out, ["record"])] and rt.wrapper_s > 0
    assert not inner.tower[1]._forward_pre_hooks  # held only during the call
    with pytest.raises(RuntimeError, match="tower failed"):
        inner.get_image_features(x, fail=True)
    assert not inner.tower[1]._forward_pre_hooks  # removed on error too
    assert len(calls) == 1
    undo()
    assert "get_image_features" not in vars(inner)


# ---------------------------------------------------------------------------------------------------- a toy family
class _ToyAdapter(VLMAdapter):
    """A family written only against the contract: a LLaVA-shaped model, one record per image, square grid."""

    names = ("ToyVLMForConditionalGeneration",)
    positions = "1d"
    installs = 0

    def tower(self, model):
        vt = model.model.vision_tower
        return getattr(vt, "vision_model", vt)

    def tower_layers(self, model):
        return self.tower(model).encoder.layers

    def feature_layer(self, model):
        return -1

    def provides(self, model):
        return {"grid", "query"}

    def install(self, model, rt):
        type(self).installs += 1

        def make_records(out, call):
            feats = out.pooler_output if hasattr(out, "pooler_output") else out
            side = int(feats[0].shape[0] ** 0.5)
            return [ImageRecord(n=f.shape[0], image=i, grid=(side, side)) for i, f in enumerate(feats)]

        return [self.hook_features(model, rt, "get_image_features", None, make_records)]


def test_a_registered_toy_family_is_used_by_wrap(restore_registry):
    from vtok.hooks.hf.tiny import tiny_inputs, tiny_model

    model = tiny_model("llava")
    inputs = tiny_inputs(model, [1, 2])
    llava_cls = type(model)
    with torch.no_grad(), vtok.wrapped(model, "divprune", 0.5):
        expected = model(**inputs).logits
        expected_stats = vtok.stats(model)
    toy_cls = type("ToyVLMForConditionalGeneration", (llava_cls,), {})
    assert register_adapter(_ToyAdapter) is _ToyAdapter
    assert "ToyVLMForConditionalGeneration" in supported()
    model.__class__ = toy_cls
    try:
        with torch.no_grad(), vtok.wrapped(model, "divprune", 0.5):
            assert _ToyAdapter.installs == 1
            got = model(**inputs).logits
            stats = vtok.stats(model)
        with pytest.raises(ValueError, match="cls_attn"):  # its provides() is what wrap checks
            vtok.wrap(model, "visionzip", 0.5)
    finally:
        model.__class__ = llava_cls
    assert torch.equal(got, expected)
    assert {k: v for k, v in stats.items() if k != "wrapper_seconds"} == \
        {k: v for k, v in expected_stats.items() if k != "wrapper_seconds"}
    assert stats["prefill_tokens_after"] < stats["prefill_tokens_before"]


def test_the_toy_family_is_gone_after_its_test():
    assert "ToyVLMForConditionalGeneration" not in supported()
    with pytest.raises(TypeError, match="does not support"):
        vtok.hooks.hf._adapter(torch.nn.Linear(1, 1))

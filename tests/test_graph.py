"""quantsim.graph: how a dummy_input is read (split_dummy_input), and which modules are leaves
under which names (leaf_modules, module_aliases)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models import DictInputNet, KeywordNet, SharedBlockNet
from quantsim import DummyInputError, KeywordInputs, UnsupportedModelError
from quantsim.graph import (forward_signature, leaf_modules, module_aliases, run_forward,
                            split_dummy_input, trace)

T = torch.zeros(2, 3)
U = torch.ones(2, 3)


class _Forward(nn.Module):
    """A module whose forward is ``fn`` (to test signatures one by one)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _with_forward(fn) -> nn.Module:
    """A module class whose own forward is ``fn`` (so its signature is ``fn``'s)."""
    return type("M", (nn.Module,), {"forward": fn})()


def _is(call, args, kwargs) -> bool:
    got_args, got_kwargs = call
    return (len(got_args) == len(args) and all(a is b for a, b in zip(got_args, args))
            and list(got_kwargs) == list(kwargs)
            and all(got_kwargs[k] is kwargs[k] for k in kwargs))


# -- the reading of each kind of dummy_input ------------------------------------------------------
def test_tensor_tuple_and_list_as_aimet_reads_them():
    """A tuple or a list is spread over the positional arguments (aimet-torch spreads both); a
    tensor is the one positional argument; a list that fits forward only as one argument (a
    forward taking a list of tensors) is that argument."""
    model = _with_forward(lambda self, a, b=None: a)
    assert _is(split_dummy_input(model, T), (T,), {})
    assert _is(split_dummy_input(model, (T, U)), (T, U), {})
    assert _is(split_dummy_input(model, [T, U]), (T, U), {})
    takes_list = _with_forward(lambda self, xs: xs)
    triple = [T, U, T]
    args, kwargs = split_dummy_input(takes_list, triple)
    assert args[0] is triple and len(args) == 1 and kwargs == {}


def test_dict_read_as_one_argument_when_keys_are_not_parameters():
    """forward(self, inputs) reading keys: the dict is the one positional argument (what
    aimet-torch passes); also with a **kwargs catch-all when the positional is required."""
    d = {"image": T, "mask": U}
    assert _is(split_dummy_input(DictInputNet(), d), (d,), {})
    catch_all = _with_forward(lambda self, inputs, **kwargs: inputs)
    assert _is(split_dummy_input(catch_all, d), (d,), {})
    non_str = {0: T}
    assert _is(split_dummy_input(DictInputNet(), non_str), (non_str,), {})


def test_dict_read_as_keywords_when_keys_name_parameters():
    """Every key a parameter name: keyword arguments, although the dict would also bind as the
    first positional argument; dict order is kept (it is the exported graph's input order)."""
    d = {"attention_mask": U, "input_ids": T}
    assert _is(split_dummy_input(KeywordNet(), d), (), d)
    only_x = _with_forward(lambda self, x, **kwargs: x)
    assert _is(split_dummy_input(only_x, {"x": T}), (), {"x": T})
    keyword_only = _with_forward(lambda self, *, mask: mask)
    assert _is(split_dummy_input(keyword_only, {"mask": U}), (), {"mask": U})


def test_dict_read_as_keywords_when_only_they_bind():
    """Keys beyond the named parameters land in **kwargs; the positional reading would leave a
    required parameter unset."""
    model = _with_forward(lambda self, x, y, **kwargs: x)
    d = {"x": T, "y": U, "extra": T}
    assert _is(split_dummy_input(model, d), (), d)


@pytest.mark.parametrize("fn, d", [
    (lambda self, x, **kwargs: x, {"x": T, "mask": U}),
    (lambda self, *args, **kwargs: args, {"a": T}),
    (lambda self, inputs=None, **kwargs: inputs, {"a": T, "b": U}),
], ids=["x-kwargs", "args-kwargs", "optional-kwargs"])
def test_ambiguous_dict_names_both_readings(fn, d):
    """Both readings bind and some key is no parameter name: a typed error that names both
    calls and how to choose each; the choices then work."""
    model = _with_forward(fn)
    with pytest.raises(DummyInputError) as info:
        split_dummy_input(model, d)
    message = str(info.value)
    for part in ("forward(dummy_input)", "forward(**dummy_input)", "(dummy_input,)",
                 "quantsim.KeywordInputs(dummy_input)", str(list(d))):
        assert part in message, message
    assert isinstance(info.value, UnsupportedModelError) and isinstance(info.value, ValueError)
    assert _is(split_dummy_input(model, (d,)), (d,), {})
    keywords = KeywordInputs(d)
    args, kwargs = split_dummy_input(model, keywords)
    assert args == () and type(kwargs) is dict and _is((args, kwargs), (), d)


def test_dict_that_fits_neither_reading():
    model = _with_forward(lambda self, x, y: x)
    with pytest.raises(DummyInputError, match=r"keys \['a'\] fits M\.forward\(x, y\) neither"):
        split_dummy_input(model, {"a": T})


def test_unreadable_signature_falls_back_to_aimet_reading():
    """No signature to read (a builtin forward): the dict is the one positional argument."""
    model = nn.Module()
    model.forward = torch.relu
    assert forward_signature(model) is None
    d = {"a": T}
    assert _is(split_dummy_input(model, d), (d,), {})


def test_keyword_inputs_repr_and_run_forward():
    keywords = KeywordInputs(input_ids=torch.tensor([[1, 2]]))
    assert repr(keywords).startswith("KeywordInputs({'input_ids': tensor(")
    torch.manual_seed(0)
    model = KeywordNet().eval()
    with torch.no_grad():
        assert torch.equal(run_forward(model, keywords), model(input_ids=keywords["input_ids"]))


# -- forward signatures ---------------------------------------------------------------------------
class _PassOn:
    """A mixin whose forward hands everything to the next class (as the quantized wrapper)."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def test_signature_looks_through_pass_on_mixins_only():
    """A (*args, **kwargs) forward in front of a base class's forward is looked through; one
    that is the model's own code (nothing behind it but nn.Module) is not."""
    wrapped = type("Wrapped", (_PassOn, DictInputNet), {})()
    assert list(forward_signature(wrapped).parameters) == ["inputs"]
    d = {"image": T, "mask": U}
    assert _is(split_dummy_input(wrapped, d), (d,), {})
    generic = _Forward(lambda inputs: inputs)
    assert list(forward_signature(generic).parameters) == ["args", "kwargs"]
    with pytest.raises(DummyInputError):
        split_dummy_input(generic, d)


# -- tracing --------------------------------------------------------------------------------------
def test_trace_records_dict_members_as_model_inputs():
    """Tensors inside a dict read as one argument are model inputs (quantized at the model
    input), whichever reading applied."""
    model = DictInputNet().eval()
    d = {"image": torch.randn(2, 3, 8, 8), "mask": torch.ones(2, 8, 8, 8)}
    graph = trace(model, d, leaf_modules(model, lambda m: not list(m.children())))
    assert graph.first_call("conv").inputs[0].kind == "model_input"


def test_trace_failure_names_the_reading():
    """A forward that fails says how dummy_input was passed, and the rule."""
    model = KeywordNet()
    with pytest.raises(UnsupportedModelError, match=r"passed as keyword arguments "
                       r"\['input_ids'\] \(IndexError.*keys name forward's parameters"):
        trace(model, {"input_ids": torch.tensor([[99]])}, leaf_modules(model, lambda m: True))
    with pytest.raises(UnsupportedModelError, match=r"passed as the one positional argument "
                       r"\(a dict\) \(KeyError: 'image'\)"):
        trace(DictInputNet(), {"picture": T}, {})


# -- modules reachable under several names --------------------------------------------------------
def test_leaf_modules_lists_a_shared_module_once_by_its_first_path():
    model = SharedBlockNet()
    leaves = leaf_modules(model, lambda m: not list(m.children()))
    assert list(leaves) == ["block", "body.1", "head"]
    assert [n for n, m in model.named_modules() if not list(m.children())] == list(leaves)
    assert module_aliases(model) == {"body.0": "block"}


def test_shared_container_aliases_its_submodules():
    model = nn.Module()
    model.a = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    model.b = model.a
    assert list(leaf_modules(model, lambda m: not list(m.children()))) == ["a.0", "a.1"]
    assert module_aliases(model) == {"b": "a", "b.0": "a.0", "b.1": "a.1"}
    assert module_aliases(nn.Sequential(nn.Linear(2, 2))) == {}


def test_doctests():
    """The examples in the module docstrings run."""
    import doctest

    from quantsim import graph

    assert doctest.testmod(graph).failed == 0

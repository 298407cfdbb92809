"""The torch.library custom ops: opcheck, fake kernels, seeds through the schema, and
torch.compile(fullgraph=True) of LoRASCLinear models on the CPU (torch backend behind)."""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from lorasc_kernels import LoRASCLinear, ops
from lorasc_kernels.backends import backend_module, composition, reference, resolve_backend_name
from lorasc_kernels.backends.specs import DropoutSpec, LinearSpec, MergeSpec, NoiseSpec
from tests.backend_params import DEVICE
from tests.helpers import lowrank_inputs

NEEDS_ALL = [True, True, True, True, True]
# (dropout_p, dropout_seed, noise_seed, noise_scale); seeds as the schema carries them.
HYPER = {
    "plain": (0.0, None, None, 0.0),
    "dropout": (0.25, ops.seed_to_int64(2**64 - 3), None, 0.0),
    "noise": (0.0, None, ops.seed_to_int64(2**63 + 11), 0.05),
}


def _forward_args(
    hyper, backend="torch", dtype=torch.float32, bias=True, lora_dtype=None, grad=True
):
    x, weight, b, lora_A, lora_B = lowrank_inputs(
        6, 10, 7, 3, dtype, lora_dtype=lora_dtype, bias=bias
    )
    for tensor in (x, lora_A, lora_B):
        tensor.requires_grad_(grad)
    return (x, weight, b, lora_A, lora_B, 1.5, *HYPER[hyper], backend)


@pytest.mark.parametrize("seed", [0, 1, 2**63 - 1, 2**63, 2**64 - 1])
def test_seed_round_trip_through_int64(seed):
    encoded = ops.seed_to_int64(seed)
    assert -(2**63) <= encoded < 2**63
    assert ops.seed_from_int64(encoded) == seed
    assert ops.seed_to_int64(None) is None and ops.seed_from_int64(None) is None


@pytest.mark.parametrize("hyper", sorted(HYPER))
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_linear_forward(hyper, bias):
    torch.library.opcheck(torch.ops.lorasc.linear_forward.default, _forward_args(hyper, bias=bias))


def test_opcheck_linear_forward_lora_dtype_differs():
    args = _forward_args("dropout", dtype=torch.bfloat16, lora_dtype=torch.float32)
    torch.library.opcheck(torch.ops.lorasc.linear_forward.default, args)


@pytest.mark.parametrize("hyper", sorted(HYPER))
@pytest.mark.parametrize(
    "needs", [NEEDS_ALL, [True, False, False, True, True], [False, False, True, False, True]]
)
def test_opcheck_linear_backward(hyper, needs):
    x, weight, b, lora_A, lora_B, scale, *rest, backend = _forward_args(hyper, grad=False)
    _, xa = torch.ops.lorasc.linear_forward(x, weight, b, lora_A, lora_B, scale, *rest, backend)
    dy = torch.randn(x.shape[0], weight.shape[0])
    torch.library.opcheck(
        torch.ops.lorasc.linear_backward.default,
        (dy, x, xa, weight, lora_A, lora_B, scale, *rest, needs, backend),
    )


@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_opcheck_merge(noise, rounding):
    weight = torch.randn(6, 9).to(torch.bfloat16)
    lora_A = torch.randn(2, 9)
    lora_B = torch.randn(6, 2)
    remove = (ops.seed_to_int64(2**64 - 1), 0.01) if noise else (None, 0.0)
    add = (5, 0.02) if noise else (None, 0.0)
    torch.library.opcheck(
        torch.ops.lorasc.merge_lowrank_.default,
        (weight, lora_B, lora_A, 0.5, rounding, 3, *remove, *add, 2, "torch", None),
    )


@pytest.mark.parametrize("name", ["merge_lowrank_", "linear_forward", "linear_backward"])
def test_no_mutated_argument_has_a_default(name):
    """The dispatcher drops a trailing argument equal to its default from the boxed call; a
    mutated one so dropped made torch 2.11's version-counter step raise IndexError on every
    merge (found on an H200). Mutated arguments must therefore be required."""
    schema = getattr(torch.ops.lorasc, name).default._schema
    defaulted = [
        arg.name
        for arg in schema.arguments
        if arg.alias_info is not None and arg.alias_info.is_write and arg.has_default_value()
    ]
    assert defaulted == []
    mutated = {
        arg.name
        for arg in schema.arguments
        if arg.alias_info is not None and arg.alias_info.is_write
    }
    assert mutated == ({"weight", "weight_scale"} if name == "merge_lowrank_" else set())


def test_opcheck_triton_backend():
    torch.library.opcheck(
        torch.ops.lorasc.linear_forward.default,
        _forward_args("noise", backend="triton", grad=False),
    )


def test_merge_op_equals_reference_with_large_seeds():
    weight = torch.randn(6, 9).to(torch.bfloat16)
    lora_A, lora_B = torch.randn(2, 9), torch.randn(6, 2)
    expected = weight.clone()
    spec = MergeSpec(
        0.5, "stochastic", 2**64 - 2, NoiseSpec(2**63 + 5, 0.01), NoiseSpec(7, 0.02), 3
    )
    reference.merge_(expected, lora_B, lora_A, spec)
    ops.merge_("torch", weight, lora_B, lora_A, spec)
    assert torch.equal(weight, expected)


def test_forward_op_uses_the_seed_it_was_given():
    """A noise seed ≥ 2**63 crosses the schema intact: the op's output equals the reference's."""
    x, weight, b, lora_A, lora_B = lowrank_inputs(5, 8, 6, 2, torch.float32)
    spec = LinearSpec(2.0, noise=NoiseSpec(2**64 - 9, 0.1))
    (y,) = torch.ops.lorasc.linear_forward(
        x, weight, b, lora_A, lora_B, *ops._linear_op_args(spec), "torch"
    )[:1]
    expected, _ = composition.linear_forward(reference, x, weight, b, lora_A, lora_B, spec)
    assert torch.equal(y, expected)
    plain = ops.linear(x, weight, b, lora_A, lora_B, LinearSpec(2.0), "torch")
    assert not torch.equal(y, plain)


def test_linear_takes_the_compile_state_its_caller_read():
    """``compiling=True`` runs the custom ops (as under ``torch.compile``; they also run
    eagerly), ``False`` the autograd Function, None reads ``is_compiling()`` (False here):
    the same values and gradients either way, through different autograd nodes."""
    x, weight, b, lora_A, lora_B = lowrank_inputs(5, 8, 6, 2, torch.float32)
    spec = LinearSpec(2.0)
    results = {}
    for compiling in (None, False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (x, lora_A, lora_B)]
        y = ops.linear(leaves[0], weight, b, leaves[1], leaves[2], spec, "torch", compiling)
        y.backward(torch.ones_like(y))
        results[compiling] = (type(y.grad_fn).__name__, y, *(t.grad for t in leaves))
    assert results[None][0] == results[False][0] != results[True][0]
    for compiling in (False, True):
        for got, expected in zip(results[compiling][1:], results[None][1:], strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_linear_reads_is_compiling_only_without_the_callers_value(monkeypatch):
    x, weight, _, lora_A, lora_B = lowrank_inputs(5, 8, 6, 2, torch.float32, bias=False)
    x.requires_grad_()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    names = {
        compiling: type(
            ops.linear(x, weight, None, lora_A, lora_B, LinearSpec(2.0), "torch", compiling).grad_fn
        ).__name__
        for compiling in (None, False)
    }
    assert names[False] == "LinearFunctionBackward" != names[None]


def test_lorasc_linear_reads_the_compile_state_once(monkeypatch):
    """``lorasc_linear`` hands its ``is_compiling()`` to ``ops.linear``, which does not read
    it again."""
    layer = LoRASCLinear(12, 8, r=2, backend="torch")
    x = torch.randn(3, 12)
    layer(x)  # first call: the checks
    reads, passed = [], []
    read, linear = torch.compiler.is_compiling, ops.linear
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: reads.append(1) or read())
    monkeypatch.setattr(ops, "linear", lambda *args: passed.append(args[7]) or linear(*args))
    layer(x).sum().backward()
    assert len(reads) == 1 and passed == [False]


def test_a_compiled_layer_traces_the_custom_ops():
    """Under ``torch.compile`` the graph holds ``lorasc::linear_forward``: a compile flag
    lost on the way would trace :class:`ops.LinearFunction`, which ``fullgraph=True`` also
    accepts."""
    torch._dynamo.reset()
    model = nn.Sequential(LoRASCLinear(12, 8, r=2, backend="torch"))
    graphs = []

    def capture(graph_module, inputs):
        graphs.append(graph_module)
        return graph_module.forward

    x = torch.randn(3, 12, requires_grad=True)
    torch.compile(model, fullgraph=True, backend=capture)(x).sum().backward()
    targets = [str(node.target) for graph in graphs for node in graph.graph.nodes]
    assert any("lorasc.linear_forward" in target for target in targets), targets


@pytest.mark.parametrize(
    "dtype, lora_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("dropout", [None, DropoutSpec(7, 0.25)], ids=["plain", "dropout"])
def test_the_composition_returns_each_gradient_in_its_inputs_dtype(
    backend, dtype, lora_dtype, dropout
):
    """Called directly: autograd would cast a gradient of another dtype back silently. A
    backend's ``dropout_lowrank_grad`` may return float32 (Triton's does)."""
    module = backend_module(backend)
    x, weight, _, lora_A, lora_B = lowrank_inputs(
        9, 32, 24, 4, dtype, DEVICE, lora_dtype=lora_dtype
    )
    dropout_p, seed = (0.0, None) if dropout is None else (dropout.p, dropout.seed)
    spec = LinearSpec.of(1.5, dropout_p, seed, None, 0.0, None)
    _, xa = composition.linear_forward(module, x, weight, None, lora_A, lora_B, spec)
    dy = torch.randn(9, 24, device=DEVICE).to(dtype)
    grads = composition.linear_backward(
        module, dy, x, xa, weight, lora_A, lora_B, spec, (True,) * 5
    )
    assert [grad.dtype for grad in grads] == [dtype, dtype, dtype, lora_dtype, lora_dtype]


@pytest.mark.parametrize("needs", [NEEDS_ALL, [False, False, False, True, True]])
def test_fake_kernels_match_real_shapes_dtypes_and_strides(needs):
    args = _forward_args("plain", dtype=torch.float16, lora_dtype=torch.float32, grad=False)
    args = (args[0].t().contiguous().t(), *args[1:])  # column-major x: outputs still row-major
    y, xa = torch.ops.lorasc.linear_forward(*args)
    x, weight, _, lora_A, lora_B, scale, *rest, backend = args
    dy = torch.randn_like(y)
    grads = torch.ops.lorasc.linear_backward(
        dy, x, xa, weight, lora_A, lora_B, scale, *rest, needs, backend
    )
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
        fake_y, fake_xa = torch.ops.lorasc.linear_forward(*fake)
        fake_grads = torch.ops.lorasc.linear_backward(
            mode.from_tensor(dy),
            fake[0],
            fake_xa,
            fake[1],
            fake[3],
            fake[4],
            scale,
            *rest,
            needs,
            backend,
        )
    assert len(grads) == len(fake_grads) == sum(needs)
    for real, fake_out in zip((y, xa, *grads), (fake_y, fake_xa, *fake_grads), strict=True):
        assert fake_out.shape == real.shape and fake_out.dtype == real.dtype
        assert fake_out.stride() == real.stride()


def test_auto_backend_picks_triton_for_cuda_tensors():
    assert resolve_backend_name("auto", torch.device("cuda")) == "triton"
    assert resolve_backend_name("auto", torch.device("cpu")) == "torch"


def _model(noise: bool) -> nn.Module:
    model = nn.Sequential(
        LoRASCLinear(12, 20, r=4, backend="torch"),
        nn.GELU(),
        LoRASCLinear(20, 6, r=3, bias=False, backend="torch"),
    )
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_()
    if noise:
        model[0].set_noise(2**64 - 1, 0.02)
    return model


def _run(model, x):
    """Output and the gradients of x and every trainable parameter after one backward."""
    x = x.detach().requires_grad_(True)
    y = model(x)
    y.square().sum().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [x.grad] + [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return y.detach(), grads


@pytest.mark.parametrize("noise", [False, True])
def test_compile_fullgraph_matches_eager(noise):
    model = _model(noise)
    x = torch.randn(2, 5, 12)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y_eager, grads_eager = _run(model, x)
    y_compiled, grads_compiled = _run(compiled, x)
    assert torch.equal(y_compiled, y_eager)
    for compiled_grad, eager_grad in zip(grads_compiled, grads_eager, strict=True):
        assert torch.equal(compiled_grad, eager_grad)


# Compiled before any eager call, in a process of its own: the backend modules are not yet
# imported when Dynamo traces the first forward.
_COLD_COMPILE = """
import torch
from torch import nn
from lorasc_kernels import LoRASCLinear

torch.manual_seed(0)
model = nn.Sequential(LoRASCLinear(12, 20, r=4), nn.GELU(), LoRASCLinear(20, 6, r=3))
with torch.no_grad():
    for layer in (model[0], model[2]):
        layer.lora_B.normal_()
x = torch.randn(2, 5, 12)
compiled = torch.compile(model, fullgraph=True)
y = compiled(x)
y.square().sum().backward()
grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
model.zero_grad()
y_eager = model(x)
y_eager.square().sum().backward()
close = lambda a, b: torch.testing.assert_close(  # Inductor reorders sums
    a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
close(y, y_eager)
for grad, p in zip(grads, [p for p in model.parameters() if p.requires_grad], strict=True):
    close(grad, p.grad)
print("compiled first:", tuple(y.shape), len(grads), "gradients")
"""


def test_compile_fullgraph_as_a_fresh_process_first_call():
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [sys.executable, "-c", _COLD_COMPILE],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled first: (2, 5, 6) 4 gradients" in result.stdout


def test_compile_fullgraph_follows_a_float_that_changes_between_calls():
    """A second value of a float (here the LoRA scale) makes Dynamo trace it as an input
    (a SymFloat): the argument checks must hold for it symbolically, not break the graph."""
    torch._dynamo.reset()
    model = _model(noise=False)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 12)
    for alpha in (2.0, 3.0, 5.0):
        model[0].lora_alpha = alpha
        assert torch.equal(compiled(x), model(x))


def test_compile_fullgraph_with_lora_dropout_names_it():
    torch._dynamo.reset()
    model = nn.Sequential(LoRASCLinear(12, 6, r=2, lora_dropout=0.1, backend="torch"))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with pytest.raises(torch._dynamo.exc.Unsupported, match="lora_dropout"):
        compiled(torch.randn(3, 12))
    torch._dynamo.reset()
    graph_broken = torch.compile(model, backend="aot_eager")  # one graph break per layer
    y = graph_broken(torch.randn(3, 12))
    y.sum().backward()
    assert model[0].lora_A.grad is not None

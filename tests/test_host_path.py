"""The host work of the hot paths, counted (not timed): aten ops, Triton launches and host
reads of one ``LoRASCLinear`` forward+backward, one ``merge_lowrank_`` and one Cascade
boundary. Counts hold on any machine; the times are ``benchmarks/bench_host.py``'s."""

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.bench_host import LaunchCounter, OpCounter, PythonCallCounter
from lorasc_kernels import Cascade, LoRASCLinear, ScaledWeight, merge_lowrank_
from lorasc_kernels.formats.quantize import quantize
from lorasc_kernels.merge import _LEFT_BOUNDS, _stamp, plan_merge

pytest.importorskip("triton")

# Ops that read a device value on the host (a sync on a GPU) or copy it to the host.
HOST_READS = ("_local_scalar_dense", "nonzero", "is_nonzero", "item", "equal")


@pytest.fixture
def tolist_reads(monkeypatch):
    """Counts ``Tensor.tolist`` calls: the one way the package reads check flags, which a
    dispatch mode does not see on the CPU (on a GPU it is a copy to the host)."""
    calls = []
    tolist = torch.Tensor.tolist

    def counted(self):
        calls.append(self.numel())
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    return calls


def _host_reads(ops: OpCounter) -> list[str]:
    return [name for name in ops.names if any(read in name for read in HOST_READS)]


@pytest.mark.parametrize("backend, most_ops", [("triton", 12), ("torch", None)])
def test_a_linear_forward_backward_issues_at_most_12_ops_and_reads_nothing(backend, most_ops):
    """Noise and dropout off, a 2-D input, gradients None as after ``zero_grad()``. Triton:
    the layer's own ops (the fused GEMM's outputs, the thin products, dA and dB scaled
    inside ``addmm``, three transposed views: ``x Aᵀ``'s, dA's and dB's; dX's GEMM takes
    ``W`` and ``A`` as stored), one ``detach`` per gradient the autograd engine stores, and
    two launches of the fused GEMM (forward y, backward dX), stubbed here. The torch reference
    backend composes its GEMM of several ops (no bound on their count), but reads nothing
    either."""
    torch.manual_seed(0)
    layer = LoRASCLinear(24, 20, r=4, backend=backend)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(8, 24, requires_grad=True)
    dy = torch.randn(8, 20)

    def call():
        x.grad = None
        layer.zero_grad()
        layer(x).backward(dy)

    with LaunchCounter(stub=True):
        call()  # first use: imports, the GEMM dispatch's choice
    with LaunchCounter(stub=True) as launches, OpCounter() as ops:
        call()
    assert most_ops is None or ops.count <= most_ops, ops.by_name()
    assert _host_reads(ops) == [] and ops.host_reads == 0, ops.by_name()
    assert launches.count == (2 if backend == "triton" else 0), launches.by_kernel


@pytest.mark.parametrize("rows, most_ops", [(8, 12), (300, 13)], ids=["one-range", "row-ranges"])
def test_with_dropout_the_thin_kernels_scale_dA_themselves(rows, most_ops):
    """Dropout on (Triton): the mask's seed drawn from torch's CPU generator (``randint`` and
    its read, no device involved), four launches (y, the thin ``drop(x) Aᵀ``, ``dA`` and
    dX). ``dA``'s scale is applied by its kernel (no ``mul_``), and on up to 256 rows its one
    row range is the result (no ``sum`` of partials; above, one)."""
    torch.manual_seed(0)
    layer = LoRASCLinear(24, 20, r=4, lora_dropout=0.1, backend="triton")
    x = torch.randn(rows, 24, requires_grad=True)
    dy = torch.randn(rows, 20)

    def call():
        x.grad = None
        layer.zero_grad()
        layer(x).backward(dy)

    with LaunchCounter(stub=True):
        call()
    with LaunchCounter(stub=True) as launches, OpCounter() as ops:
        call()
    names = ops.by_name()
    assert ops.count <= most_ops and launches.count == 4, (names, launches.by_kernel)
    assert names["aten.mul_.Tensor"] == 0
    assert names["aten.sum.dim_IntList"] == (rows > 256)
    assert _host_reads(ops) == ["aten._local_scalar_dense.default"], names  # the seed


# Python calls into the package per forward+backward (2-D input, noise and dropout off),
# as counted on 2026-12-07: the layer, the checks of a known call, the autograd Function,
# the composition and, on Triton, each launch's dispatch and arguments (no device-switch
# wrapper with one GPU or none; the launch scalars from one lookup; backends/triton/launch.py,
# one call per launch that skips the autotuner's ~12 µs on a GPU; the tiled variant called
# directly in the tiled mode, a measured choice read without Dispatch.choose). More means
# host time added at every call of every layer: say why in the commit that raises a bound.
# "triton-measure": bf16 under the GEMM dispatch's default on CUDA tensors (``measure``,
# here with a fake timer), the problem's choice known: each launch finds its problem by
# the call's layout.
PACKAGE_CALLS = {"triton": 29, "torch": 19, "triton-measure": 33}


@pytest.mark.parametrize("case", sorted(PACKAGE_CALLS))
def test_a_linear_forward_backward_makes_few_python_calls(case, monkeypatch):
    """Counted with ``sys.setprofile`` (:class:`PythonCallCounter`): a count that the load of
    the machine does not move, where a time does."""
    backend, _, mode = case.partition("-")
    dtype = torch.float32
    if mode:
        from lorasc_kernels.backends.triton import gemm_dispatch

        monkeypatch.setattr(gemm_dispatch, "mode", mode)
        monkeypatch.setattr(gemm_dispatch, "DISPATCH", gemm_dispatch.Dispatch(lambda run: 1.0))
        dtype = torch.bfloat16
    torch.manual_seed(0)
    layer = LoRASCLinear(24, 24, r=4, backend=backend, dtype=dtype)
    x = torch.randn(8, 24, dtype=dtype, requires_grad=True)
    dy = torch.randn(8, 24, dtype=dtype)

    def call():
        x.grad = None
        layer.zero_grad()
        layer(x).backward(dy)

    with LaunchCounter(stub=True):
        call()  # first use: imports, the checks of a new call, the GEMM dispatch's choice
        with PythonCallCounter() as calls:
            call()
    assert 0 < calls.package <= PACKAGE_CALLS[case], calls.package


def _weight(kind: str) -> torch.Tensor | ScaledWeight:
    torch.manual_seed(1)
    weight = torch.randn(40, 24)
    if kind == "bfloat16":
        return weight.bfloat16()
    return quantize(weight, getattr(torch, kind))


@pytest.mark.parametrize("kind", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_a_merge_reads_the_device_once(kind, tolist_reads):
    """Every value check of a standalone merge (finite factors, W's range, fp8 scales) is
    computed on the device and read in ONE transfer, the flags; nothing else is read."""
    weight = _weight(kind)
    lora_B, lora_A = torch.randn(40, 3), torch.randn(3, 24)
    merge_lowrank_(weight, lora_B, lora_A, 0.5, backend="torch")  # first use
    tolist_reads.clear()
    with OpCounter() as ops:
        merge_lowrank_(weight, lora_B, lora_A, 0.5, noise_add=(3, 0.1), backend="torch")
    assert len(tolist_reads) == 1 and tolist_reads[0] <= 2
    assert _host_reads(ops) == [] and ops.host_reads == 0, ops.by_name()


def test_a_refused_merge_still_names_what_is_wrong():
    """The flags say only "refused": the reason is found after, on the way to the error."""
    weight = torch.randn(40, 24)
    lora_A = torch.randn(3, 24)
    lora_A[1, 5] = float("nan")
    with pytest.raises(ValueError, match="lora_A has non-finite values"):
        merge_lowrank_(weight, torch.randn(40, 3), lora_A, 0.5)
    weight[7, 2] = float("inf")
    with pytest.raises(ValueError, match=r"weight has non-finite values \(row 7\)"):
        merge_lowrank_(weight, torch.randn(40, 3), torch.randn(3, 24), 0.5)


@pytest.mark.parametrize("weight_format", [None, "fp8_e4m3"])
def test_a_cascade_boundary_over_every_layer_reads_the_device_once(weight_format, tolist_reads):
    """Three layers, in-place noise, a slow update of another parameter, metrics off: the
    fast LoRAs' and the other parameter's finiteness, whether any fast LoRA trained, and
    every layer's merge checks are read in one transfer."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if weight_format else torch.float32
    layers = [
        LoRASCLinear(16, 16, r=2, backend="torch", dtype=dtype, weight_format=weight_format)
        for _ in range(3)
    ]
    model = nn.Sequential(*layers, nn.Linear(16, 4).to(dtype))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cascade = Cascade(model, optimizer, steps_per_cascade=1, noise_lambda=0.1, slow_rate=0.5)
    cascade.track_metrics(every=0)
    model(torch.randn(4, 16).to(dtype)).float().square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    tolist_reads.clear()
    with OpCounter() as ops:
        assert cascade.step()  # the boundary
    assert len(tolist_reads) == 1
    assert _host_reads(ops) == [] and ops.host_reads == 0, ops.by_name()
    assert cascade.last_boundary["lorasc/merge_ms"] >= 0  # read after, when asked


def test_the_compiled_path_custom_ops_read_nothing():
    """What ``torch.compile`` (and CUDA-graph capture, ``mode="reduce-overhead"``) runs:
    the ``lorasc::linear_forward`` and ``lorasc::linear_backward`` ops, which must neither
    sync nor read a device value on the host (a capture would fail on it)."""
    torch.manual_seed(0)
    x, weight = torch.randn(8, 24), torch.randn(20, 24)
    lora_A, lora_B, dy = torch.randn(4, 24), torch.randn(20, 4), torch.randn(8, 20)
    args = (0.5, 0.0, None, None, 0.0, "triton")
    with LaunchCounter(stub=True):
        torch.ops.lorasc.linear_forward(x, weight, None, lora_A, lora_B, *args)
    with LaunchCounter(stub=True) as launches, OpCounter() as ops:
        _, xa = torch.ops.lorasc.linear_forward(x, weight, None, lora_A, lora_B, *args)
        torch.ops.lorasc.linear_backward(
            dy, x, xa, weight, lora_A, lora_B, *args[:5], [True, False, False, True, True], "triton"
        )
    assert _host_reads(ops) == [] and ops.host_reads == 0, ops.by_name()
    assert launches.count == 2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_train_step_replayed_from_a_cuda_graph_trains_as_eagerly(backend):
    """What ``torch.compile(mode="reduce-overhead")`` needs, on a GPU: a ``LoRASCLinear``
    train step (forward with the cascade noise, backward, SGD on the factors) captured in a
    CUDA graph (a sync or a host read in it would fail the capture) and replayed on new
    inputs gives the factors of the same steps run eagerly. bf16, no bias, M = 1024 (noise
    by the noisy-weight pass): the Triton kernels the other GPU tests compiled (shared
    cache; a new specialization would compile every autotune config)."""
    torch.manual_seed(0)
    layer = LoRASCLinear(
        4096, 4096, bias=False, r=16, backend=backend, device="cuda", dtype=torch.bfloat16
    )
    layer.set_noise(7, 0.01)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.02)  # B starts at zero: A's gradient would be zero too
    twin = copy.deepcopy(layer)
    before = {name: getattr(layer, name).detach().clone() for name in ("lora_A", "lora_B")}
    inputs = [torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(6)]

    def train_step(model: LoRASCLinear, x: torch.Tensor):
        # lr: factors move by about half their size over the steps (a replay that did
        # nothing differs in 60-90 % of their elements; dry-run on the CPU)
        optimizer = torch.optim.SGD([model.lora_A, model.lora_B], lr=20.0)

        def step():
            optimizer.zero_grad(set_to_none=True)
            model(x).float().square().mean().backward()
            optimizer.step()

        return step

    static_x = inputs[0].clone()
    step = train_step(layer, static_x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: the checks, autotuning, the dispatch's choices
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # recorded, not run
        step()
    for x in inputs[1:]:
        static_x.copy_(x)
        graph.replay()

    twin_x = inputs[0].clone()
    twin_step = train_step(twin, twin_x)
    for _ in range(3):
        twin_step()
    for x in inputs[1:]:
        twin_x.copy_(x)
        twin_step()
    torch.cuda.synchronize()
    for name, initial in before.items():
        replayed, eager = getattr(layer, name), getattr(twin, name)
        assert not torch.equal(eager, initial)  # the steps train: the comparison means something
        torch.testing.assert_close(replayed, eager)


class _Reads(TorchDispatchMode):
    """The ops that take a tensor sharing ``watched``'s storage (they read or write it)."""

    def __init__(self, watched: torch.Tensor):
        super().__init__()
        self.storage = watched.untyped_storage().data_ptr()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [*args, *(kwargs or {}).values()]
        if any(
            isinstance(arg, torch.Tensor) and arg.untyped_storage().data_ptr() == self.storage
            for arg in flat
        ):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_the_next_merge_of_an_unchanged_weight_reads_none_of_it(kind):
    """The checks of a merge read W (a row-wise max) once; the merge remembers a bound of
    its rows, so the checks of the next merge of the same, unwritten W read none of it.
    A write to W in between is seen and W read again."""
    weight = _weight(kind)
    codes = weight.codes if isinstance(weight, ScaledWeight) else weight
    lora_B, lora_A = torch.randn(40, 3), torch.randn(3, 24)
    arguments = dict(noise_add=(3, 0.1), backend="torch")
    with _Reads(codes) as first:
        plan_merge(weight, lora_B, lora_A, 0.5, **arguments)
    assert first.ops  # the detector sees the row-wise max
    merge_lowrank_(weight, lora_B, lora_A, 0.5, **arguments)
    for _ in range(2):
        with _Reads(codes) as later:
            plan = plan_merge(weight, lora_B, lora_A, 0.5, **arguments)
        assert later.ops == []
        plan.conclude(plan.flags.tolist())()
    codes[5, 2] = 0  # any write bumps W's version: read again
    with _Reads(codes) as after_write:
        plan_merge(weight, lora_B, lora_A, 0.5, **arguments)
    assert after_write.ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_weight_written_after_a_merge_is_checked_again(dtype):
    """A non-finite value written into W after a merge, in place or by replacing its data,
    is refused at the next merge as before."""
    weight = torch.randn(40, 24).to(dtype)
    lora_B, lora_A = torch.randn(40, 3), torch.randn(3, 24)
    merge_lowrank_(weight, lora_B, lora_A, 0.5)
    weight[7, 2] = float("inf")
    with pytest.raises(ValueError, match=r"weight has non-finite values \(row 7\)"):
        merge_lowrank_(weight, lora_B, lora_A, 0.5)
    weight[7, 2] = 0
    merge_lowrank_(weight, lora_B, lora_A, 0.5)
    weight.data = torch.full_like(weight, float("nan"))
    with pytest.raises(ValueError, match=r"weight has non-finite values \(row 0\)"):
        merge_lowrank_(weight, lora_B, lora_A, 0.5)


@pytest.mark.parametrize("kind", ["bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2"])
def test_the_remembered_row_bounds_hold_merge_after_merge(kind):
    """Over merges with noise and stochastic rounding, on rows of ordinary, tiny (subnormal
    after rounding) and zero values, each remembered bound is at least the row's largest
    magnitude (dequantized for a scaled W), computed here after each merge."""
    torch.manual_seed(2)
    values = torch.randn(6, 32)
    values[1] *= 1e-30 if kind != "float16" else 1e-6
    values[2] = 0
    if kind.startswith("float8"):
        weight = quantize(values, getattr(torch, kind))
    else:
        weight = values.to(getattr(torch, kind))
    codes = weight.codes if isinstance(weight, ScaledWeight) else weight
    for step in range(8):
        lora_B, lora_A = torch.randn(6, 4), torch.randn(4, 32)
        lora_B[1:3] *= 1e-6  # tiny updates of the tiny and zero rows
        plan = plan_merge(weight, lora_B, lora_A, 0.3, seed=step, noise_add=(step, 1e-3))
        plan.conclude(plan.flags.tolist())()
        row_scale = weight.scale if isinstance(weight, ScaledWeight) else None
        bounds = _LEFT_BOUNDS.get(codes, _stamp(codes, row_scale))
        assert bounds is not None
        actual = codes.double().abs().amax(dim=1)
        if row_scale is not None:
            actual = actual * row_scale.double()
        assert bool((bounds >= actual).all()), (step, bounds, actual)

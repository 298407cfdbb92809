"""Distributed training: DDP and FSDP2 runs on 2 CPU processes (gloo), shard-wise merges,
sharded statistics and checksums.

The process tests launch ``tests/distributed_workers/cascade_worker.py``, ``fp8_worker.py``
and ``examples/torchrun_ddp.py`` once per rank with the environment ``torchrun`` would set
(localhost, a free port, this checkout first on ``PYTHONPATH``), bounded in time; every rank
is killed when one fails.
"""

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from lorasc_kernels import LoRASCLinear, merge_lowrank_
from lorasc_kernels.distributed import (
    _block_checksum,
    _row_moments,
    assert_weights_equal_across_ranks,
    global_std,
    local_row_block,
    tensor_checksum,
    weight_checksums,
)
from lorasc_kernels.formats.quantize import quantize

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_workers" / "cascade_worker.py"
FP8_WORKER = ROOT / "tests" / "distributed_workers" / "fp8_worker.py"
EXAMPLE = ROOT / "examples" / "torchrun_ddp.py"
RANKS = 2
TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(script: Path, args: list[str], log_dir: Path) -> list[str]:
    """Run ``script`` on ``RANKS`` CPU processes; return each rank's output.

    Fails (after killing every rank) when a rank exits with an error or the run takes
    longer than ``TIMEOUT_S``.
    """
    port = free_port()
    processes, logs = [], []
    try:
        for rank in range(RANKS):
            env = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(RANKS),
                "LOCAL_WORLD_SIZE": str(RANKS),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
                "CUDA_VISIBLE_DEVICES": "",
                "PYTHONPATH": os.pathsep.join(
                    filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))
                ),
            }
            logs.append(log_dir / f"{script.stem}.rank{rank}.log")
            with open(logs[-1], "w") as log:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, str(script), *args],
                        env=env,
                        cwd=ROOT,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in processes):
            failed = any(p.returncode not in (None, 0) for p in processes)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    outputs = [log.read_text() for log in logs]
    codes = [p.returncode for p in processes]
    assert codes == [0] * RANKS, f"{script.name} exited with {codes}:\n" + "\n".join(
        f"--- rank {rank} ---\n{text[-3000:]}" for rank, text in enumerate(outputs)
    )
    return outputs


def launch_and_load(script: Path, out_dir: Path) -> list[dict]:
    """Run a worker ``script`` on ``RANKS`` processes; what each rank saved."""
    launch(script, [str(out_dir)], out_dir)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(RANKS)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """What each rank of the DDP and FSDP2 scenarios measured (one 2-process run)."""
    return launch_and_load(WORKER, tmp_path_factory.mktemp("distributed"))


@pytest.fixture(scope="module")
def fp8_runs(tmp_path_factory):
    """What each rank of the fp8 FSDP2 scenarios measured (one 2-process run)."""
    return launch_and_load(FP8_WORKER, tmp_path_factory.mktemp("distributed_fp8"))


# -- DDP ------------------------------------------------------------------------------------


def test_ddp_gradients_equal_single_process_on_the_global_batch(runs):
    for run in runs:
        errors = run["ddp"]["grad_errors"]
        assert len(errors) == 5
        assert max(errors) < 1e-5, errors


def test_ddp_weights_after_boundaries_match_single_process(runs):
    """Within fp32 tolerance, not bit for bit: DDP averages gradients in another order."""
    for run in runs:
        errors = run["ddp"]["weight_errors"]
        assert len(errors) == 2 and max(errors) < 1e-5, errors


def test_ddp_weights_bit_identical_across_ranks_after_each_boundary(runs):
    per_rank = [run["ddp"]["boundary_checksums"] for run in runs]
    assert len(per_rank[0]) == 2
    assert per_rank[0] == per_rank[1]
    first, second = per_rank[0]
    assert first["module.0.weight"] != second["module.0.weight"]  # the boundary changed W


def test_ddp_slow_update_of_a_trained_bias_is_exact_and_identical_on_every_rank(runs):
    for run in runs:
        assert run["ddp"]["slow_updates"] == [True, True]
        assert run["ddp"]["bias_error"] < 1e-5
    first, second = (run["ddp"]["boundary_checksums"] for run in runs)
    assert first == second
    assert first[0]["module.2.bias"] != first[1]["module.2.bias"]


def test_checksum_helper_names_a_weight_that_differs_on_one_rank(runs):
    for run in runs:
        message = run["ddp"]["mismatch_message"]
        assert "module.2.weight" in message and "module.0.weight" not in message


# -- FSDP2 ----------------------------------------------------------------------------------


def test_fsdp_forward_hands_the_kernels_unsharded_parameters(runs):
    for rank, run in enumerate(runs):
        fsdp = run["fsdp"]
        full_shapes = fsdp["weight_shapes"]
        assert fsdp["local_weight_shapes"] == [((6, 5)[rank], 13), ((3, 2)[rank], 11)]
        seen = fsdp["kernel_inputs"]
        assert len(seen) == 2 * 5
        for call, weight_shape in zip(seen, full_shapes * 5, strict=True):
            assert call["weight"] == (False, weight_shape)
            rank_r = call["lora_A"][1][0]
            assert call["lora_A"] == (False, (rank_r, weight_shape[1]))
            assert call["lora_B"] == (False, (weight_shape[0], rank_r))


def test_fsdp_boundaries_equal_the_unsharded_run_bit_for_bit(runs):
    for run in runs:
        states = run["fsdp"]["states"]
        assert len(states) == 3  # after the first noise, then after each boundary
        for sharded, unsharded in states:
            assert sharded.keys() == unsharded.keys()
            for name, value in sharded.items():
                assert torch.equal(value, unsharded[name]), name
        assert not torch.equal(states[1][0]["0.weight"], states[0][0]["0.weight"])
        assert torch.count_nonzero(states[2][0]["2.lora_B"]) == 0  # a fresh fast LoRA
        assert run["fsdp"]["history_equal"]


def test_fsdp_slow_update_of_a_sharded_parameter_is_in_place_and_resumes(runs):
    """A trained gain's 5 rows are sharded 3 + 2: each rank anchors and updates its own rows,
    and the whole equals the unsharded run's slow update (states checked bit for bit above)."""
    for rank, run in enumerate(runs):
        fsdp = run["fsdp"]
        assert fsdp["slow_updates"] == [True, True]
        assert fsdp["local_anchor_shapes"] == [((3, 2)[rank],)]
        assert fsdp["resumed_anchors_equal"]
        for sharded, _ in fsdp["states"][1:]:
            assert "3.weight" in sharded


def test_fsdp_boundary_gathers_no_weight(runs):
    for run in runs:
        fsdp = run["fsdp"]
        assert len(fsdp["gathered_shapes"]) == 2
        for shapes in fsdp["gathered_shapes"]:
            assert (3, 13) in shapes and (2, 11) in shapes  # the small A of each layer
            assert not set(shapes) & set(fsdp["weight_shapes"])


def test_fsdp_checksums_and_noise_scales_equal_the_unsharded_run_on_every_rank(runs):
    """After each boundary, the sharded checksum of every tensor (computed without a
    gather) equals the unsharded run's, and every rank agrees."""
    for run in runs:
        assert len(run["fsdp"]["checksums"]) == 2
        for sharded, unsharded, compared in run["fsdp"]["checksums"]:
            assert sharded == unsharded == compared
        scales, reference_scales = run["fsdp"]["noise_scales"]
        assert scales == reference_scales
    assert runs[0]["fsdp"]["checksums"] == runs[1]["fsdp"]["checksums"]
    assert runs[0]["fsdp"]["noise_scales"] == runs[1]["fsdp"]["noise_scales"]


def test_fsdp_rank_holding_no_rows_of_a_weight(runs):
    assert [run["edge"]["local_rows"] for run in runs] == [1, 0]
    for run in runs:
        sharded, unsharded = run["edge"]["states"]
        for name, value in sharded.items():
            assert torch.equal(value, unsharded[name]), name
        assert "Shard(dim=1)" in run["edge"]["column_shard_error"]


def test_fsdp_gradients_match_single_process_within_bf16_tolerance(runs):
    for run in runs:
        errors = run["fsdp"]["grad_errors"]
        assert len(errors) == 5 and max(errors) < 2e-2, errors


# -- FSDP2 on fp8 weights ------------------------------------------------------------------

FP8_SCENARIOS = ("default", "paper", "compute")  # compute: the layers in compute="fp8"
FP8_ROW_BLOCKS = {"0": ((0, 6), (6, 11)), "2": ((0, 3), (3, 5))}  # each rank's rows


def merges(run):
    """Each merge's snapshot of a scenario: the boundaries, then finalize()."""
    return [*run["boundaries"], run["final"]]


def max_difference(first, second):
    return float((first.double() - second.double()).abs().max())


def test_fsdp_fp8_merges_rescale_rows_held_by_each_rank(fp8_runs):
    """The updates are large enough that every boundary rescales rows of both ranks."""
    for scenario in FP8_SCENARIOS:
        run = fp8_runs[0][scenario]
        before = run["initial_scales"]
        assert len(run["boundaries"]) == 2
        for boundary in run["boundaries"]:
            for name, blocks in FP8_ROW_BLOCKS.items():
                rescaled = boundary["ref_scales"][name] > before[name]
                assert all(rescaled[start:stop].any() for start, stop in blocks), (scenario, name)
            before = boundary["ref_scales"]


def test_fsdp_fp8_ranks_agree_after_each_boundary_and_finalize(fp8_runs):
    """Every rank holds the same weight_scale buffers, computes the same output and, after
    finalize(), the same dequantized weights, bit for bit."""
    for scenario in FP8_SCENARIOS:
        per_rank = [merges(run[scenario]) for run in fp8_runs]
        for index, (first, second) in enumerate(zip(*per_rank, strict=True)):
            where = (scenario, index)
            difference = max_difference(first["output"], second["output"])
            assert difference == 0, f"{where}: outputs differ by up to {difference}"
            for name in first.get("scales", {}):
                assert torch.equal(first["scales"][name], second["scales"][name]), (where, name)
            for name, value in first["state"].items():
                assert torch.equal(value, second["state"][name]), (where, name)


def test_fsdp_fp8_merges_equal_the_unsharded_run_bit_for_bit(fp8_runs):
    for run in fp8_runs:
        for scenario in FP8_SCENARIOS:
            sharded_noise, unsharded_noise = run[scenario]["noise_scales"]
            assert sharded_noise == unsharded_noise
            assert all(scale > 0 for scale in sharded_noise) == (scenario == "paper")
            assert (scenario == "compute") == (run[scenario]["compute"] == "fp8")
            for index, merge in enumerate(merges(run[scenario])):
                where = (scenario, index)
                assert torch.equal(merge["output"], merge["ref_output"]), where
                for name, scale in merge.get("scales", {}).items():
                    assert torch.equal(scale, merge["ref_scales"][name]), (where, name)
                assert merge["state"].keys() == merge["ref_state"].keys()
                for name, value in merge["state"].items():
                    assert torch.equal(value, merge["ref_state"][name]), (where, name)


def test_fsdp_fp8_finalize_dequantizes_each_rank_rows_into_a_sharded_weight(fp8_runs):
    for rank, run in enumerate(fp8_runs):
        for scenario in FP8_SCENARIOS:
            assert run[scenario]["final"]["weights"] == [
                ("DTensor", "(Shard(dim=0),)", ((6, 5)[rank], 13), torch.float32),
                ("DTensor", "(Shard(dim=0),)", ((3, 2)[rank], 11), torch.float32),
            ]


def test_fsdp_fp8_rank_holding_no_rows_gets_the_rescaled_scale(fp8_runs):
    assert [run["edge"]["local_rows"] for run in fp8_runs] == [1, 0]
    for run in fp8_runs:
        before, after, unsharded = run["edge"]["scales"]
        assert bool(after > before) and torch.equal(after, unsharded)
        final, unsharded_final = run["edge"]["final"]
        assert torch.equal(final, unsharded_final)


# -- the example ----------------------------------------------------------------------------


def test_torchrun_ddp_example_runs_on_two_cpu_processes(tmp_path):
    outputs = launch(EXAMPLE, ["--steps", "12", "--steps-per-cascade", "4"], tmp_path)
    assert outputs[0].count("weights agree on 2 ranks") == 3
    assert "done: 2 ranks (gloo, DDP), 12 steps, 3 boundaries" in outputs[0]
    assert "done:" not in outputs[1]


# -- shard-wise pieces, in one process ------------------------------------------------------


def row_blocks(rows: int, ranks: int) -> list[tuple[int, int]]:
    """``(row_offset, rows)`` of each rank's block, sharded like FSDP2 (``torch.chunk``)."""
    chunk = -(-rows // ranks)
    return [(min(r * chunk, rows), max(0, min(chunk, rows - r * chunk))) for r in range(ranks)]


@pytest.mark.parametrize("ranks", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shardwise_merge_equals_the_whole_merge(ranks, dtype):
    rows, cols, r = 23, 19, 3
    weight = torch.randn(rows, cols).to(dtype)
    lora_b, lora_a = torch.randn(rows, r), torch.randn(r, cols)
    settings = {"coeff": 0.37, "seed": 11, "noise_remove": (5, 0.02), "noise_add": (6, 0.02)}
    whole = merge_lowrank_(weight.clone(), lora_b, lora_a, **settings)
    sharded = weight.clone()
    for offset, count in row_blocks(rows, ranks):
        block = sharded[offset : offset + count]  # a view, as a shard's local tensor is
        merge_lowrank_(
            block, lora_b[offset : offset + count], lora_a, row_offset=offset, **settings
        )
    assert torch.equal(sharded, whole)
    assert not torch.equal(whole, weight)


def test_plain_tensor_is_its_own_row_block():
    weight = torch.randn(5, 4)
    block, offset = local_row_block(weight)
    assert block is weight and offset == 0


def test_row_moments_of_shards_and_global_std():
    weight = (torch.randn(23, 19) * 0.1 + 0.3).to(torch.bfloat16)
    cols = weight.shape[1]
    whole = _row_moments(weight, cols)
    by_shard = torch.cat([_row_moments(weight[o : o + n], cols) for o, n in row_blocks(23, 3)])
    assert torch.equal(by_shard, whole)
    assert global_std(weight) == pytest.approx(float(weight.double().std()), rel=1e-12)


def test_global_std_of_a_scaled_weight_is_that_of_its_dequantized_rows():
    scaled = quantize(torch.randn(23, 19) * 0.1 + 0.3, torch.float8_e4m3fn)
    q, scale = scaled.codes, scaled.scale
    exact = q.double() * scale.double()[:, None]  # exact: 4 + 24 significant bits
    by_shard = torch.cat(
        [_row_moments(q[o : o + n], 19, scale[o : o + n]) for o, n in row_blocks(23, 3)]
    )
    assert torch.equal(by_shard, _row_moments(exact, 19))
    assert global_std(q, scale) == pytest.approx(float(exact.std()), rel=1e-12)


def test_checksum_is_exact_and_additive_over_row_blocks():
    weight = torch.randn(23, 19)
    whole = tensor_checksum(weight)
    parts = sum(_block_checksum(weight[o : o + n], o) for o, n in row_blocks(23, 3))
    assert parts % 2**64 == whole
    assert tensor_checksum(weight.clone()) == whole
    nudged = weight.clone()
    nudged[7, 3] = torch.nextafter(nudged[7, 3], torch.tensor(10.0))
    assert tensor_checksum(nudged) != whole
    assert tensor_checksum(weight.t().contiguous()) != whole  # positions matter
    assert tensor_checksum(weight.to(torch.bfloat16)) != tensor_checksum(weight)


def test_weight_checksums_single_process():
    layer = LoRASCLinear(7, 5, r=2)
    checksums = assert_weights_equal_across_ranks(layer)  # no process group: nothing to compare
    assert checksums == weight_checksums(layer)
    assert set(checksums) == {"weight", "bias", "lora_A", "lora_B"}


def test_reset_lora_of_a_plain_layer_is_the_plain_init():
    """The layer's reset (FSDP2-aware through init_rows) draws a plain A as the init does."""
    layer = LoRASCLinear(7, 5, r=2)
    layer.reset_lora(torch.Generator().manual_seed(4))
    expected = torch.empty(2, 7)
    nn.init.kaiming_uniform_(expected, a=math.sqrt(5), generator=torch.Generator().manual_seed(4))
    assert torch.equal(layer.lora_A, expected)
    assert torch.count_nonzero(layer.lora_B) == 0

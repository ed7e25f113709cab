"""The GPU speed benchmark's code path on the tiny checkpoint (CPU, float32), so the script the
H200 figures come from cannot rot between lent-machine runs: its proof rows must show the doubled
batch and one DiT call per step, and it must end without a recorded failure."""
from __future__ import annotations

import pytest

from benchmarks import step_speed


def test_step_speed_runs_its_real_path_on_the_tiny_checkpoint(tiny_checkpoint, tmp_path):
    step_speed.RESULTS.clear()
    assert step_speed.main(["--device", "cpu", "--dtypes", "float32", "--checkpoints", str(tiny_checkpoint),
                            "--work", str(tmp_path), "--seconds", "2", "--variants", "eager,attention",
                            "--loop-variants", "attention", "--steps-list", "2,3", "--repeats", "1",
                            "--cold-runs", "0", "--fresh-variant", "none"]) == 0
    results = step_speed.RESULTS
    assert not [k for k in results if k.endswith("_error")], {k: v for k, v in results.items() if k.endswith("_error")}
    assert results["float32_proof_forward_inputs"]["hidden_states"][0] == 2  # guidance doubled the batch
    for name in ("eager", "attention"):
        for steps in (2, 3):
            row = results[f"float32_steps_{name}_{steps}"]
            assert row["dit"]["calls"] == steps and row["dit"]["batch_sizes"] == {"2": steps} and row["finite"]
    assert results["float32_variant_attention"]["on"] == ["contiguous", "fused", "attention"]
    assert results["float32_variant_attention"]["rel_err_vs_eager"] < 1e-5


@pytest.mark.parametrize("bench, mode, prefix", [("cold_runner", "noprefetch", "cold_runner"),
                                                   ("prestarted_runner", "noimport", "prestarted")])
def test_cold_request_benchmarks_run_both_forms_of_the_runner(bench, mode, prefix, tiny_checkpoint, tmp_path):
    """The cold-request rows compare `SWITCHES` with `SWITCHES/MODE`: a one-shot `lego` with and
    without the compiled blocks' prefetch; `serve` started ahead with and without their loader
    imported while it waits (the service's cold request). Both forms must be real runs of the job."""
    from types import SimpleNamespace

    from benchmarks import cold_compile

    rows = {}
    args = SimpleNamespace(work=str(tmp_path), seconds=2, cold_runs=1, device="cpu", dtypes=["float32"],
                           cold_settings=f"contiguous;contiguous/{mode}")
    getattr(cold_compile, bench)(tiny_checkpoint, args, rows.__setitem__)
    assert sorted(rows) == [f"{prefix}_contiguous_1", f"{prefix}_contiguous_{mode}_1"]
    for row in rows.values():
        assert "error" not in row, row["error"]
        assert row["speedups"]["on"] == ["contiguous"] and row["speedups"]["dit_forwards"]["calls"] == 50
        if bench == "prestarted_runner":
            assert row["timings"]["import_s"] == 0.0 and row["import_s"] > 0  # the stack came in while it waited
            assert row["job_s"] >= row["timings"]["total_s"] - 0.01  # the job line to the result holds the whole job

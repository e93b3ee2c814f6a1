"""The benchmark harness itself (gfl_ops.bench), on tiny shapes.

Not timings: that every provider the benchmark times computes the loss and the gradient
of gfl_ops.reference from the same inputs (the frameworks' own code included, where they
are installed: how the harness calls them is checked too), that the byte model and the
memory measurement count what they claim, and that a --quick style run completes and
writes the JSON it documents.

The compile provider runs with torch.compile's "aot_eager" backend here, which traces
the same fullgraph forward and backward as inductor without generating C++ (minutes on a
cold cache); one test keeps inductor for QFL.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

import gfl_ops
from gfl_ops import bench, reference
from tools import mmcv_ops_standin

# mmdetection's losses import mmcv.ops: mmcv-lite gets the stand-in, as the framework tests do.
mmcv_ops_standin.install()
FRAMEWORKS_REQUIRED = os.environ.get("GFL_OPS_REQUIRE_FRAMEWORKS") == "1"

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
TINY_QFL = (64, 5)  # 64 anchors: 2 x 5 x 4 x 8 channel-first
TINY_DFL = (32, 17)


def _case(op: str, layout: str = "nc", dtype: torch.dtype = torch.float32) -> bench.Case:
    if op in ("dfl", "integral"):
        return bench.Case(op, *TINY_DFL, "rows", dtype)
    return bench.Case(op, *TINY_QFL, layout, dtype)


def _reference_output(case: bench.Case, inputs: bench.Inputs):
    """The loss (E for the integral) and d/d pred in float64, from the harness's inputs."""
    pred = inputs.pred.detach().double().requires_grad_()
    args = tuple(arg.double() if arg.is_floating_point() else arg for arg in inputs.args)
    ref_fn = bench.OP_SPECS[case.op].reference
    output = ref_fn(pred, *args, **inputs.kwargs)
    grad_out = None if inputs.grad_out is None else inputs.grad_out.double()
    output.backward(grad_out)
    return output.detach(), pred.grad


def _provider_output(name: str, case: bench.Case, inputs: bench.Inputs, compile_backend: str = "aot_eager"):
    fn = bench.make_provider(name, case, torch.device("cpu"), compile_backend)
    output = bench.run_step(fn, inputs, "full")  # exactly what the benchmark times
    grad = inputs.pred.grad
    bench.clear_grad(inputs)
    return output.detach(), grad


CASES = [
    pytest.param(op, layout, id=f"{op}-{layout}")
    for op in bench.OPS
    for layout in (("nc", "nchw") if op in ("qfl", "qfl_prob") else ("nc",))
]


@pytest.mark.parametrize("op, layout", CASES)
def test_every_provider_matches_the_reference(op, layout):
    case = _case(op, layout)
    inputs = bench.make_inputs(case, torch.device("cpu"))
    expected_output, expected_grad = _reference_output(case, inputs)
    providers = bench.available_providers(op, torch.device("cpu"))
    assert {"native", "reference", "compile"} <= set(providers)
    if FRAMEWORKS_REQUIRED:  # make test installs them: every peer of the op must run
        assert set(bench.OP_SPECS[op].peers) <= set(providers), bench.provider_status(op, torch.device("cpu"))
    for name in providers:
        output, grad = _provider_output(name, case, inputs)
        assert grad is not None, f"{name}: no gradient reached pred"
        assert grad.shape == inputs.pred.shape and grad.dtype == inputs.pred.dtype, name
        torch.testing.assert_close(output.double(), expected_output, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_compile_provider_with_inductor_matches_the_reference():
    case = _case("qfl")
    inputs = bench.make_inputs(case, torch.device("cpu"))
    expected_output, expected_grad = _reference_output(case, inputs)
    output, grad = _provider_output("compile", case, inputs, compile_backend="inductor")
    torch.testing.assert_close(output.double(), expected_output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


def test_inputs_are_realistic():
    case = bench.Case("qfl", 10000, 80, "nchw", torch.float32)
    inputs = bench.make_inputs(case, torch.device("cpu"))
    label, score = inputs.args
    assert inputs.pred.shape == (2, 80, 50, 100) and inputs.pred.requires_grad
    assert label.shape == score.shape == (2, 50, 100)
    positive = (label >= 0) & (label < 80)
    assert int(positive.sum()) == 100  # 1% positives, background = C elsewhere
    assert set(label[~positive].unique().tolist()) == {80}
    avg_factor = inputs.kwargs["avg_factor"]
    assert isinstance(avg_factor, torch.Tensor) and avg_factor.dim() == 0 and float(avg_factor) == 100.0

    dfl = bench.make_inputs(bench.Case("dfl", 1000, 17, "rows", torch.float32), torch.device("cpu"))
    (target,) = dfl.args
    assert float(target.min()) >= 0 and float(target.max()) <= 16 - 0.1
    assert dfl.kwargs["weight"].shape == (1000,)


def test_byte_model():
    case = bench.Case("qfl", 1000, 80, "nc", torch.float32)
    pred = 1000 * 80 * 4
    assert bench.bytes_moved(case, "forward") == pred + 1000 * (8 + 4)
    assert bench.bytes_moved(case, "full") == bench.bytes_moved(case, "forward") + 2 * pred
    half = bench.Case("qfl_dense", 1000, 80, "nc", torch.bfloat16)
    assert bench.bytes_moved(half, "full") == 4 * 1000 * 80 * 2


def test_peak_memory_counts_the_allocations_of_a_step():
    size = 1 << 20

    def step():
        first = torch.ones(size, dtype=torch.uint8)
        second = torch.ones(size, dtype=torch.uint8)  # both alive: the peak is two
        del first, second
        return torch.ones(size // 2, dtype=torch.uint8)

    peak = bench.peak_extra_bytes(step, torch.device("cpu"))
    if peak is None:
        pytest.skip("this torch's profiler does not report CPU allocations")
    assert 2 * size <= peak < 2 * size + 4096


@pytest.mark.parametrize("gradient_pass", ["forward", "backward"])
@pytest.mark.parametrize("op", ["qfl", "focal", "varifocal", "dfl", "integral"])
def test_a_native_training_step_holds_one_buffer_of_preds_size(op, gradient_pass, set_gradient_pass):
    """Forward + backward holds the gradient (which becomes pred.grad without a copy): no
    second pred-sized buffer, and for a reduced loss no per-anchor loss vector either (the
    operator sums as it goes). The integral's output E is one value per row. With the
    gradient in the backward pass (CUDA's choice) a step also holds the per-anchor (per-row)
    factor d total / d loss that the backward hands the kernel as its weight (the integral:
    its grad_scale), in float32."""
    if "native" not in bench.available_providers(op, torch.device("cpu")):
        pytest.skip("the native CPU kernels are not built")
    set_gradient_pass("cpu", gradient_pass)
    classes = op in ("qfl", "focal", "varifocal")
    case = bench.Case(op, 4096, 80 if classes else 17, "nc" if classes else "rows", torch.float32)
    inputs = bench.make_inputs(case, torch.device("cpu"))
    fn = bench.make_provider("native", case, torch.device("cpu"))
    bench.run_step(fn, inputs, "full")  # first call outside the measurement
    bench.clear_grad(inputs)
    peak = bench.peak_extra_bytes(lambda: bench.run_step(fn, inputs, "full"), torch.device("cpu"))
    if peak is None:
        pytest.skip("this torch's profiler does not report CPU allocations")
    assert inputs.pred.grad is not None
    outputs = case.rows * 4 if op == "integral" else 0  # E, float32
    if gradient_pass == "backward":
        outputs += case.rows * 4  # the per-anchor (per-row) factor, float32
    scalars = 64  # the 0-dim loss and its quotient by avg_factor
    assert case.pred_bytes + outputs <= peak <= case.pred_bytes + outputs + scalars, peak - case.pred_bytes


def test_quick_run_writes_the_documented_json(tmp_path, capsys):
    json_path = tmp_path / "bench.json"
    plot_path = tmp_path / "bench.png"
    argv = [
        "--device", "cpu", "--quick", "--qfl-shapes", "64x5", "--dfl-shapes", "32x17",
        "--repeats", "2", "--warmup", "1", "--compile-backend", "aot_eager",
        "--json", str(json_path), "--plot", str(plot_path),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "median ms" in printed and "native x" in printed and "H200 floor us" in printed

    document = json.loads(json_path.read_text())
    assert {"device", "versions", "date", "git_commit", "config", "rows"} <= set(document)
    assert {"torch", "triton", "cuda", "gfl_ops"} <= set(document["versions"])
    assert {"type", "name", "threads"} <= set(document["device"])
    assert document["device"]["type"] == "cpu"

    rows = document["rows"]
    # quick: qfl in both layouts and dfl, full mode only, every available provider
    providers = set(bench.available_providers("qfl", torch.device("cpu"))) - {"triton"}  # interpreter: not timed
    assert {(row["op"], row["shape_label"]) for row in rows} == {("qfl", "64x5"), ("qfl", "2x5x4x8"), ("dfl", "32x17")}
    assert {row["mode"] for row in rows} == {"full"} and {row["dtype"] for row in rows} == {"fp32"}
    assert {row["provider"] for row in rows} == providers
    # Each provider of these ops that did not run is named, with its reason (the peers of
    # other ops, torchvision and ultralytics, are no providers of QFL and DFL).
    applicable = {name for op in ("qfl", "dfl") for name in bench.provider_status(op, torch.device("cpu"))}
    assert set(document["not_run"]) == applicable - providers
    assert all(document["not_run"].values()) and document["package"] == str(Path(gfl_ops.__file__).parent)
    for row in rows:
        assert row["error"] is None, row
        for key in ("median_ms", "native_speedup", "peak_extra_bytes", "peak_extra_over_pred", "bandwidth_fraction"):
            assert key in row
        assert row["median_ms"] > 0 and row["repeats"] == 2
        assert math.isfinite(row["native_speedup"]) and row["bandwidth_fraction"] > 0
        # the roofline: the byte model at 3.0 and 4.3 TB/s; no fraction of it on a CPU
        assert row["floor_ms_h100"] == pytest.approx(row["bytes_model"] / 3.0e9)
        assert row["floor_ms_h200"] == pytest.approx(row["bytes_model"] / 4.3e9)
        assert row["floor_fraction"] is None
        if row["provider"] == "native":
            assert row["native_speedup"] == 1.0
    if plot_path.exists():  # matplotlib installed
        assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_of_quick_and_cpu_default():
    cases, settings, _ = bench.plan(bench.parse_args(["--device", "cpu", "--quick"]))
    assert settings.modes == ["full"] and settings.repeats == 7
    assert {(case.op, case.rows, case.classes, case.dtype) for case in cases} == {
        ("qfl", 44800, 80, torch.float32),
        ("qfl", 134400, 80, torch.float32),
        ("dfl", 16384, 17, torch.float32),
        ("dfl", 65536, 17, torch.float32),
    }
    default, _, notes = bench.plan(bench.parse_args(["--device", "cpu"]))
    assert max(case.rows for case in default if case.op == "qfl") == 134400
    assert max(case.rows for case in default if case.op == "dfl") == 65536
    assert notes  # what the CPU default left out is said
    full, _, _ = bench.plan(bench.parse_args(["--device", "cpu", "--full"]))
    assert max(case.rows for case in full if case.op == "qfl") == 537600


def test_error_rows_are_reported_not_raised():
    rows = [dict(op="qfl", mode="full", shape_label="8x3", dtype="fp32", provider="mmdet", error="RuntimeError: boom")]
    assert "error: RuntimeError: boom" in bench.format_table(rows)


BAD_BENCH_FLAGS = [
    (["--qfl-shapes", "0x80"], "argument --qfl-shapes: a shape's sizes must be at least 1"),
    (["--dfl-shapes", "64x0"], "argument --dfl-shapes: a shape's sizes must be at least 1"),
    (["--json", "README.md/results.json"], "argument --json: .* cannot be written"),
    (["--plot", "gfl_ops"], "argument --plot: 'gfl_ops' is a folder"),
    (["--from-json", "no-such-results.json"], "argument --from-json: 'no-such-results.json': no such file"),
    (["--device", "tpu"], "argument --device: 'tpu' is not a torch device"),
]
BAD_FRAMEWORK_STEP_FLAGS = [
    (["--device", "tpu"], "argument --device: 'tpu' is not a torch device"),
    (["--json", "README.md/x.json"], "argument --json: .* cannot be written"),
    (["--repeats", "0"], "--repeats must be at least 1"),
]


@pytest.mark.parametrize("argv, message", BAD_BENCH_FLAGS, ids=[" ".join(argv) for argv, _ in BAD_BENCH_FLAGS])
def test_bad_flags_are_refused_before_anything_runs(argv, message, capsys, monkeypatch):
    """A usage error (exit 2) naming the flag, before any case runs: an unwritable --json
    used to fail only after the whole run, its numbers lost."""
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    monkeypatch.setattr(bench.cli, "run", lambda *arguments: pytest.fail("a case ran"))
    with pytest.raises(SystemExit) as raised:
        bench.main(argv)
    assert raised.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv, message", BAD_FRAMEWORK_STEP_FLAGS, ids=[" ".join(argv) for argv, _ in BAD_FRAMEWORK_STEP_FLAGS]
)
def test_framework_step_refuses_bad_flags_before_anything_runs(argv, message, capsys, monkeypatch):
    """tools/framework_step.py: the same usage errors, before any framework is imported."""
    from tools import framework_step

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    monkeypatch.setattr(framework_step, "run", lambda *arguments: pytest.fail("a step ran"))
    with pytest.raises(SystemExit) as raised:
        framework_step.main(argv)
    assert raised.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_run_whose_rows_failed_exits_non_zero(monkeypatch, capsys):
    failed = dict(
        op="qfl",
        mode="full",
        shape_label="8x3",
        layout="nc",
        dtype="fp32",
        provider="native",
        error="RuntimeError: boom",
        median_ms=None,
    )
    monkeypatch.setattr(bench.cli, "run", lambda cases, settings: [failed])
    monkeypatch.setattr(bench.cli, "_print_report", lambda rows, device_type: None)
    assert bench.main(["--device", "cpu", "--quick", "--no-memory"]) == 1
    assert "1 of 1 rows failed" in capsys.readouterr().out


def test_module_entry_point(capsys):
    from gfl_ops.__main__ import main

    assert main([]) == 0
    assert "bench" in capsys.readouterr().out
    assert main(["nonsense"]) == 2


def test_reference_dense_target_matches_labels():
    """qfl_dense's inputs: the dense target holds the score on the labelled class only."""
    case = _case("qfl_dense")
    inputs = bench.make_inputs(case, torch.device("cpu"))
    (target,) = inputs.args
    assert target.shape == inputs.pred.shape
    assert int((target != 0).sum()) == int(inputs.kwargs["avg_factor"])
    assert reference.quality_focal_loss_dense(inputs.pred, target, avg_factor=inputs.kwargs["avg_factor"]).isfinite()


def _row(provider, op, shape, dtype="fp32", layout="nc", **figures):
    row = dict(provider=provider, op=op, mode="full", shape=list(shape), layout=layout, dtype=dtype, error=None)
    row.update(dict(native_speedup=1.0, peak_extra_bytes=None, peak_extra_over_pred=None, bandwidth_fraction=0.0))
    row.update(figures)
    return row


def test_headlines_judge_each_target_of_the_device():
    cpu_rows = [
        _row("native", "qfl", (44800, 80), peak_extra_bytes=100, peak_extra_over_pred=1.0004),
        _row("mmdet", "qfl", (44800, 80), native_speedup=6.0),
        _row("compile", "qfl", (44800, 80), native_speedup=1.2),
        _row("native", "dfl", (16384, 17), layout="rows", peak_extra_bytes=100, peak_extra_over_pred=1.06),
    ]
    text = bench.format_headlines(cpu_rows, "cpu")
    qfl, dfl = text.splitlines()[1:]
    assert "6.00x mmdet (target >= 5x: met)" in qfl and "1.20x compile (target >= 1.5x: MISSED)" in qfl
    assert "peak 1.00x pred (target <= 1x: met)" in qfl  # 0-dim outputs are no buffer
    assert "peak 1.06x pred (target <= 1x: MISSED)" in dfl
    assert "qfl full 134400x80" not in text  # not measured: not reported

    cuda_rows = [
        _row("native", "qfl", (537600, 80), dtype="bf16", peak_extra_bytes=10, bandwidth_fraction=0.8),
        _row("reference", "qfl", (537600, 80), dtype="bf16", native_speedup=12.0, peak_extra_bytes=40),
        _row("compile", "qfl", (537600, 80), dtype="bf16", native_speedup=1.4),
    ]
    line = bench.format_headlines(cuda_rows, "cuda").splitlines()[1]
    assert "12.00x reference (target >= 10x: met)" in line and "1.40x compile (target >= 1.3x: met)" in line
    assert "80% of copy bandwidth (target >= 75%: met)" in line
    assert "peak 4.0x below reference (target >= 5x: MISSED)" in line
    assert bench.format_headlines(cuda_rows, "cpu") == ""


def test_half_precision_plan():
    """--half: native alone, in fp32, fp16 and bf16, at the half-precision target's shapes."""
    cases, settings, _ = bench.plan(bench.parse_args(["--device", "cpu", "--half"]))
    assert settings.modes == ["full"] and settings.providers == ["native"]
    assert [(case.op, case.rows, case.classes, case.layout, bench.dtype_name(case.dtype)) for case in cases] == [
        (op, rows, classes, layout, dtype)
        for op, rows, classes, layout in (("qfl", 134400, 80, "nc"), ("dfl", 65536, 17, "rows"))
        for dtype in ("fp32", "fp16", "bf16")
    ]
    with pytest.raises(SystemExit):
        bench.parse_args(["--half", "--quick"])


def test_fp32_ratio_is_reported_and_judged():
    rows = [
        _row("native", "qfl", (134400, 80), median_ms=10.0),
        _row("native", "qfl", (134400, 80), dtype="fp16", median_ms=12.0),
        _row("native", "qfl", (134400, 80), dtype="bf16", median_ms=16.0),
        _row("native", "dfl", (65536, 17), layout="rows", dtype="bf16", median_ms=1.0),  # no fp32 row
    ]
    bench.add_fp32_ratios(rows)
    assert [row["fp32_ratio"] for row in rows] == [1.0, 1.2, 1.6, None]
    text = bench.format_headlines(rows, "cpu")
    assert "qfl full 134400x80 nc fp16: native 1.20x its fp32 step (target <= 1.5x: met)" in text
    assert "qfl full 134400x80 nc bf16: native 1.60x its fp32 step (target <= 1.5x: MISSED)" in text
    assert "dfl full 65536x17" not in text  # its fp32 step was not measured: no verdict
    for row in rows:
        row.update(shape_label="x".join(map(str, row["shape"])), min_ms=row["median_ms"], achieved_gbps=1.0)
    header = bench.format_table(rows).splitlines()[0]
    assert header.split()[-2:] == ["x", "fp32"]


def test_a_provider_that_cannot_run_is_named_with_its_reason(monkeypatch):
    real = bench.providers.provider_status

    def without_mmdet(op, device):
        return dict(real(op, device), mmdet="the baseline is broken here")

    monkeypatch.setattr(bench.providers, "provider_status", without_mmdet)
    cpu = torch.device("cpu")
    names, skipped = bench.select_providers("qfl", cpu)
    assert "mmdet" not in names and skipped["mmdet"] == "the baseline is broken here"
    _, _, notes = bench.plan(bench.parse_args(["--device", "cpu", "--quick"]))
    assert "not run: mmdet: the baseline is broken here" in notes
    _, _, asked = bench.plan(bench.parse_args(["--device", "cpu", "--quick", "--providers", "native", "mmdet"]))
    assert "not run: mmdet: the baseline is broken here" in asked
    assert not any(note.startswith("not run: triton") for note in asked)  # not asked for


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda path: path.name)
def test_saved_results_are_read_back(path, tmp_path, capsys):
    document = bench.load_results(path)
    assert document["rows"] and all("fp32_ratio" in row for row in document["rows"] if not row.get("error"))
    plot = tmp_path / "saved.png"
    assert bench.main(["--from-json", str(path), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "median ms" in printed and "Headline targets" in printed
    assert "plot written" in printed or "matplotlib is not installed" in printed


@pytest.mark.parametrize("path", sorted((RESULTS / "frameworks").glob("*.json")), ids=lambda path: path.name)
def test_saved_framework_results_hold_each_step(path):
    """python -m tools.framework_step --json: a row per framework step, its medians."""
    import json

    from tools import framework_step as frameworks

    document = json.loads(path.read_text())
    assert document["environment"]["device"]["name"]
    rows = document["framework_steps"]
    assert [row["step"] for row in rows] == list(frameworks.FRAMEWORK_STEPS)
    for row in rows:
        assert row["stock_s"] > 0 and row["fused_s"] > 0 and row["assignment_s"] > 0
        assert row["speedup"] == pytest.approx(row["stock_s"] / row["fused_s"])


def test_roofline_floor_and_fraction():
    from gfl_ops.bench import roofline

    assert roofline.floor_ms(3_000_000_000, "H100") == pytest.approx(1.0)  # 3 GB at 3.0 TB/s
    assert roofline.floor_ms(8_600_000_000, "H200") == pytest.approx(2.0)  # 8.6 GB at 4.3 TB/s
    assert roofline.gpu_kind("NVIDIA H100 80GB HBM3") == "H100"
    assert roofline.gpu_kind("NVIDIA H200") == "H200"
    assert roofline.gpu_kind("AMD EPYC") is None and roofline.gpu_kind("NVIDIA A100-SXM4-80GB") is None
    assert roofline.floor_fraction(4_300_000_000, 2.0, "NVIDIA H200") == pytest.approx(0.5)
    assert roofline.floor_fraction(4_300_000_000, 2.0, "AMD EPYC") is None

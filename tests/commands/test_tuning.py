"""The tuning table (gfl_ops/_tuning.py): its derivation from bench results, backend="auto"
and the gradient pass as it steers them, and `python -m gfl_ops tune`. Runs on CPU: CUDA
devices are torch.device objects whose name lookup the tests replace."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import gfl_ops.__main__
from gfl_ops import _backends, _ops, _tuning, resolve_backend, tune

GPU = "Test GPU"
CUDA0 = torch.device("cuda", 0)
QFL, DFL = "quality_focal_loss", "distribution_focal_loss"


def _row(op, dtype, provider, median_ms, shape_label="8400x80", layout="nc", mode="full", error=None):
    return dict(
        op=op,
        mode=mode,
        shape_label=shape_label,
        layout=layout,
        dtype=dtype,
        provider=provider,
        median_ms=median_ms,
        error=error,
    )


def _write_results(path, rows, device_name=GPU, device_type="cuda"):
    document = dict(
        device=dict(type=device_type, name=device_name, threads=1, cpu_count=16),
        date="2026-01-02T03:04:05+00:00",
        git_commit="0123abc",
        config={},
        rows=rows,
    )
    path.write_text(json.dumps(document))
    return str(path)


@pytest.fixture
def default_run(tmp_path):
    """Native and triton under the default gradient pass. quality_focal_loss float32: native
    / triton 2 (qfl) and 8 (qfl_prob), a geometric mean of 4; distribution_focal_loss
    bfloat16: 1 / 3. The rows that must not count would each flip a choice."""
    return _write_results(
        tmp_path / "default.json",
        [
            _row("qfl", "fp32", "native", 2.0),
            _row("qfl", "fp32", "triton", 1.0),
            _row("qfl_prob", "fp32", "native", 8.0),
            _row("qfl_prob", "fp32", "triton", 1.0),
            _row("dfl", "bf16", "native", 1.0, "4096x17", "rows"),
            _row("dfl", "bf16", "triton", 3.0, "4096x17", "rows"),
            # triton failed here, after some rounds: its error, not its time, decides
            _row("dfl", "bf16", "native", 900.0, "65536x17", "rows"),
            _row("dfl", "bf16", "triton", 0.001, "65536x17", "rows", error="RuntimeError: out of memory"),
            # forward-only rows and other providers do not take part
            _row("dfl", "bf16", "native", 100.0, "16384x17", "rows", mode="forward"),
            _row("dfl", "bf16", "triton", 1.0, "16384x17", "rows", mode="forward"),
            _row("qfl", "fp32", "reference", 0.001),
            # float16, measured by native only: its gradient pass ratio must be left out
            _row("qfl", "fp16", "native", 1.0),
        ],
    )


@pytest.fixture
def forward_run(tmp_path):
    """Native with the gradient in the forward pass: forward / backward 0.5 (qfl float32)
    and 1.5 (dfl bfloat16), a geometric mean of sqrt(0.75) < 1; the float16 ratio of 10
    would make it about 1.96; the integral case has no default-run peer."""
    return _write_results(
        tmp_path / "default-gradient-in-forward.json",
        [
            _row("qfl", "fp32", "native", 1.0),
            _row("dfl", "bf16", "native", 1.5, "4096x17", "rows"),
            _row("qfl", "fp16", "native", 10.0),
            _row("integral", "fp32", "native", 0.001, "4096x17", "rows"),
        ],
    )


def test_backends_are_chosen_by_the_geometric_mean_of_full_mode_ratios(default_run):
    entry = tune.derive_table([default_run])[GPU]
    assert entry["backends"] == {QFL: {"float32": "triton"}, DFL: {"bfloat16": "native"}}
    assert entry["native_over_triton"][QFL]["float32"] == dict(ratio=4.0, cases=2)
    assert entry["native_over_triton"][DFL]["bfloat16"] == dict(ratio=round(1 / 3, 4), cases=1)
    assert "gradient_pass" not in entry  # not measured without a gradient-in-forward run
    assert entry["source"] == [
        dict(file=default_run, gradient_pass="backward", date="2026-01-02T03:04:05+00:00", git_commit="0123abc")
    ]


def test_gradient_pass_is_chosen_from_the_two_runs(default_run, forward_run):
    entry = tune.derive_table([default_run], [forward_run])[GPU]
    assert entry["gradient_pass"] == "forward"
    assert entry["forward_over_backward"] == dict(ratio=round(math.sqrt(0.75), 4), cases=2)
    assert [source["gradient_pass"] for source in entry["source"]] == ["backward", "forward"]


def test_gradient_pass_stays_backward_where_forward_is_slower(default_run, tmp_path):
    slower = _write_results(tmp_path / "slower.json", [_row("qfl", "fp32", "native", 3.0)])
    entry = tune.derive_table([default_run], [slower])[GPU]
    assert entry["gradient_pass"] == "backward"
    assert entry["forward_over_backward"] == dict(ratio=1.5, cases=1)


def test_derived_table_reads_back(default_run, forward_run, tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(tune.derive_table([default_run], [forward_run])))
    assert _tuning.read_table(path)[GPU]["backends"][QFL] == {"float32": "triton"}


@pytest.mark.parametrize(
    "rows, device_type, message",
    [
        ([_row("qfl", "fp32", "native", 1.0)], "cuda", "no case that native and triton both ran in mode 'full'"),
        (
            [_row("qfl", "fp32", "native", 1.0), _row("qfl", "fp32", "triton", None, error="boom")],
            "cuda",
            "no case that native and triton both ran",
        ),
        ([_row("qfl", "fp32", "native", 1.0), _row("qfl", "fp32", "triton", 1.0)], "cpu", "measured on 'cpu'"),
        ([_row("nonsense", "fp32", "native", 1.0)], "cuda", "unknown op 'nonsense'"),
        ([_row("qfl", "int8", "native", 1.0)], "cuda", "unknown dtype 'int8'"),
        ([dict(op="qfl", mode="full")], "cuda", "row 0: lacks"),
        *[
            (
                [_row("qfl", "fp32", "native", 1.0), _row("qfl", "fp32", "triton", median)],
                "cuda",
                f"row 1: median_ms must be a finite number of milliseconds above 0, got {re.escape(repr(median))}",
            )
            for median in (0.0, -1.0, float("nan"), float("inf"), None, "1.0", True)
        ],
    ],
)
def test_unusable_results_are_refused_naming_the_file(tmp_path, rows, device_type, message):
    path = _write_results(tmp_path / "bad.json", rows, device_type=device_type)
    with pytest.raises(ValueError, match=f"results files? {re.escape(path)}[:,] .*{message}"):
        tune.derive_table([path])


def test_results_of_different_devices_are_refused(default_run, tmp_path):
    other = _write_results(tmp_path / "other.json", [_row("qfl", "fp32", "native", 1.0)], device_name="Other GPU")
    with pytest.raises(ValueError, match="measured on different devices.*'Other GPU'"):
        tune.derive_table([default_run], [other])


def test_gradient_in_forward_run_without_common_cases_is_refused(default_run, tmp_path):
    unrelated = _write_results(tmp_path / "unrelated.json", [_row("integral", "fp32", "native", 1.0)])
    with pytest.raises(ValueError, match=f"gradient-in-forward files {unrelated}: no native 'full' case"):
        tune.derive_table([default_run], [unrelated])


# --------------------------------------------------------------------------------------
# Loading the table
# --------------------------------------------------------------------------------------


def test_table_path_follows_the_environment(monkeypatch, tmp_path):
    table = {GPU: dict(backends={QFL: {"float32": "triton"}}, gradient_pass="forward")}
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(_tuning.ENVIRONMENT_VARIABLE, str(path))
    assert _tuning.load_table() == table
    monkeypatch.setenv(_tuning.ENVIRONMENT_VARIABLE, "")
    assert _tuning.load_table() == {}
    monkeypatch.setenv(_tuning.ENVIRONMENT_VARIABLE, str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="GFL_OPS_TUNING=.*missing.json: no such file"):
        _tuning.load_table()
    monkeypatch.delenv(_tuning.ENVIRONMENT_VARIABLE)
    monkeypatch.setattr(_tuning, "PACKAGE_TABLE", tmp_path / "absent.json")
    assert _tuning.load_table() == {}  # the package's file is optional


@pytest.mark.parametrize(
    "table, message",
    [
        ([], "expected an object of device names"),
        ({GPU: {}}, f"device '{GPU}': expected an object with a 'backends' object"),
        ({GPU: dict(backends={"nonsense": {}})}, "unknown operator 'nonsense'"),
        ({GPU: dict(backends={QFL: {"float32": "reference"}})}, "backends of quality_focal_loss must map"),
        ({GPU: dict(backends={QFL: {"fp32": "triton"}})}, "backends of quality_focal_loss must map"),
        ({GPU: dict(backends={QFL: {"float32": ["triton"]}})}, "backends of quality_focal_loss must map"),
        ({GPU: dict(backends={}, gradient_pass="sideways")}, "gradient_pass must be one of"),
    ],
)
def test_malformed_tables_are_refused(tmp_path, table, message):
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match=f"tuning table {path}.*{message}"):
        _tuning.read_table(path)


# --------------------------------------------------------------------------------------
# The device name lookup
# --------------------------------------------------------------------------------------


@pytest.fixture
def device_name_calls(monkeypatch):
    """The indices torch.cuda.get_device_name is called with, from an empty cache."""
    calls = []
    monkeypatch.setattr(_tuning, "_CUDA_DEVICE_NAMES", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: calls.append(index) or f"GPU {index}")
    return calls


def test_device_names_are_cached_per_index(device_name_calls):
    assert _tuning.cuda_device_name(CUDA0) == "GPU 0"
    assert _tuning.cuda_device_name(torch.device("cuda", 1)) == "GPU 1"
    assert _tuning.cuda_device_name(CUDA0) == "GPU 0"
    assert device_name_calls == [0, 1]


def test_device_name_is_not_read_while_tracing(monkeypatch, device_name_calls):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _tuning.cuda_device_name(CUDA0) is None
    _tuning._CUDA_DEVICE_NAMES[0] = GPU
    assert _tuning.cuda_device_name(CUDA0) == GPU  # once cached, tracing reads the cache
    assert device_name_calls == []


def test_no_device_lookup_without_a_table(monkeypatch, device_name_calls):
    monkeypatch.setattr(_tuning, "TABLE", {})
    assert _tuning.tuned_backend(CUDA0, QFL, torch.float32) is None
    assert _tuning.tuned_gradient_pass(CUDA0) is None
    assert device_name_calls == []


# --------------------------------------------------------------------------------------
# backend="auto" and the gradient pass
# --------------------------------------------------------------------------------------


@pytest.fixture
def gradient_pass_calls(monkeypatch):
    """The calls of _ops.apply_gradient_pass, which is replaced (the real setting is
    untouched), from a process where no tuned pass has been applied and none was chosen."""
    calls = []
    monkeypatch.setattr(_ops, "apply_gradient_pass", lambda *arguments: calls.append(arguments))
    monkeypatch.setattr(_backends, "_tuned_gradient_pass_applied", False)
    monkeypatch.setattr(_ops, "GRADIENT_PASS_CHOSEN", set())
    return calls


@pytest.fixture
def tuned_gpu(monkeypatch, gradient_pass_calls):
    """cuda:0 is GPU, with native and triton available and a table that prefers triton for
    quality_focal_loss in float32 and sets the gradient pass to forward."""
    monkeypatch.setattr(_tuning, "cuda_device_name", lambda device: GPU)
    monkeypatch.setattr(
        _tuning,
        "TABLE",
        {
            GPU: dict(
                backends={QFL: {"float32": "triton", "bfloat16": "native"}, DFL: {"float32": "triton"}},
                gradient_pass="forward",
            ),
        },
    )
    monkeypatch.setattr(_ops, "has_native_kernel", lambda operator, device_type: True)
    monkeypatch.setattr(_backends._triton, "available", lambda device_type: True)
    return monkeypatch


def test_auto_runs_the_tuned_backend(tuned_gpu):
    assert resolve_backend("auto", CUDA0, QFL, torch.float32) == "triton"
    assert resolve_backend("auto", CUDA0, QFL, dtype=torch.bfloat16) == "native"
    assert resolve_backend("auto", "cuda:0", DFL, torch.float32) == "triton"


def test_auto_keeps_the_fixed_order_where_the_table_does_not_say(tuned_gpu):
    assert resolve_backend("auto", CUDA0, QFL) == "native"  # no dtype given
    assert resolve_backend("auto", CUDA0, QFL, torch.float16) == "native"  # dtype not in the table
    assert resolve_backend("auto", CUDA0, "varifocal_loss", torch.float32) == "native"  # operator not in it
    assert resolve_backend("auto", "cpu", QFL, torch.float32) == "native"  # CPU is not tuned
    tuned_gpu.setattr(_tuning, "cuda_device_name", lambda device: "Untuned GPU")
    assert resolve_backend("auto", CUDA0, QFL, torch.float32) == "native"


def test_auto_falls_back_where_the_tuned_backend_is_unavailable(tuned_gpu):
    tuned_gpu.setattr(_backends._triton, "available", lambda device_type: False)
    assert resolve_backend("auto", CUDA0, QFL, torch.float32) == "native"
    tuned_gpu.setattr(_backends._triton, "available", lambda device_type: True)
    tuned_gpu.setattr(_ops, "has_native_kernel", lambda operator, device_type: False)
    assert resolve_backend("auto", CUDA0, QFL, torch.bfloat16) == "triton"  # tuned native, not built


def test_auto_keeps_the_fixed_order_without_a_table(tuned_gpu):
    tuned_gpu.setattr(_tuning, "TABLE", {})
    assert resolve_backend("auto", CUDA0, QFL, torch.float32) == "native"


def test_explicit_backends_are_not_overridden(tuned_gpu, gradient_pass_calls):
    assert resolve_backend("native", CUDA0, QFL, torch.float32) == "native"
    assert resolve_backend("reference", CUDA0, QFL, torch.float32) == "reference"
    assert resolve_backend("triton", CUDA0, QFL, torch.bfloat16) == "triton"
    assert gradient_pass_calls == []


def test_tuned_gradient_pass_is_set_once(tuned_gpu, gradient_pass_calls):
    resolve_backend("auto", "cpu", QFL, torch.float32)
    assert gradient_pass_calls == []  # CPU is not tuned
    resolve_backend("auto", CUDA0, QFL, torch.float32)
    resolve_backend("auto", CUDA0, DFL, torch.float32)
    assert gradient_pass_calls == [("cuda", "forward")]


def test_tuned_gradient_pass_leaves_a_chosen_pass(tuned_gpu, gradient_pass_calls):
    """set_gradient_pass("cuda", ...) (or GFL_OPS_GRADIENT_PASS at load) is the user's choice."""
    _ops.set_gradient_pass("cuda", "backward")  # its kernel call is replaced by the fixture
    assert gradient_pass_calls == [("cuda", "backward")]
    assert resolve_backend("auto", CUDA0, QFL, torch.float32) == "triton"
    assert gradient_pass_calls == [("cuda", "backward")]


def test_tuned_gradient_pass_is_not_set_while_tracing(tuned_gpu, gradient_pass_calls):
    tuned_gpu.setattr(torch.compiler, "is_compiling", lambda: True)
    resolve_backend("auto", CUDA0, QFL, torch.float32)
    assert gradient_pass_calls == []


def test_gradient_pass_from_the_environment_counts_as_chosen():
    chosen = subprocess.run(
        [sys.executable, "-c", "import gfl_ops; print(sorted(gfl_ops._ops.GRADIENT_PASS_CHOSEN))"],
        env=dict(os.environ, GFL_OPS_GRADIENT_PASS="backward"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert chosen.stdout.strip() == "['cpu', 'cuda']"


@pytest.mark.parametrize("cached, expected", [(True, 1.0), (False, 0.0)])
def test_auto_traces_under_torch_compile(monkeypatch, gradient_pass_calls, cached, expected):
    """The lookup traces in one graph: the cached name gives the tuned backend, an uncached
    one the fixed order, without a call into CUDA."""
    monkeypatch.setattr(_tuning, "_CUDA_DEVICE_NAMES", {0: GPU} if cached else {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: pytest.fail("CUDA called while tracing"))
    monkeypatch.setattr(_tuning, "TABLE", {GPU: dict(backends={QFL: {"float32": "triton"}})})
    monkeypatch.setattr(_ops, "has_native_kernel", lambda operator, device_type: True)
    monkeypatch.setattr(_backends._triton, "available", lambda device_type: True)

    def step(x):
        backend = resolve_backend("auto", CUDA0, QFL, x.dtype)
        return x + (1.0 if backend == "triton" else 0.0)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    assert compiled(torch.zeros(2)).tolist() == [expected, expected]
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------
# python -m gfl_ops tune
# --------------------------------------------------------------------------------------


def test_tune_writes_the_table_and_keeps_other_devices(default_run, forward_run, tmp_path, capsys):
    output = tmp_path / "tuning.json"
    output.write_text(json.dumps({"Other GPU": dict(backends={DFL: {"float32": "triton"}})}))
    argv = ["tune", default_run, "--gradient-in-forward", forward_run, "--output", str(output)]
    assert gfl_ops.__main__.main(argv) == 0
    table = _tuning.read_table(output)
    assert table[GPU]["backends"] == {QFL: {"float32": "triton"}, DFL: {"bfloat16": "native"}}
    assert table[GPU]["gradient_pass"] == "forward"
    assert table["Other GPU"] == dict(backends={DFL: {"float32": "triton"}})
    printed = capsys.readouterr().out
    assert "quality_focal_loss" in printed and "triton  native / triton 4.000 over 2 cases" in printed
    assert "gradient pass forward" in printed and str(output) in printed


def _tune_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_tune_refuses_bad_input_naming_the_argument(default_run, tmp_path, capsys):
    missing = str(tmp_path / "missing.json")
    assert f"results file {missing}: no such file" in _tune_error([missing], capsys)
    assert f"gradient-in-forward file {missing}: no such file" in _tune_error(
        [default_run, "--gradient-in-forward", missing], capsys
    )
    native_only = _write_results(tmp_path / "native.json", [_row("qfl", "fp32", "native", 1.0)])
    assert "no case that native and triton both ran" in _tune_error([native_only], capsys)
    not_json = tmp_path / "not.json"
    not_json.write_text("{")
    assert f"results file {not_json}: not readable as JSON" in _tune_error([str(not_json)], capsys)
    bad_output = tmp_path / "bad-output.json"
    bad_output.write_text("[]")
    assert "argument --output: tuning table" in _tune_error([default_run, "--output", str(bad_output)], capsys)
    assert "the following arguments are required: RESULTS" in _tune_error([], capsys)

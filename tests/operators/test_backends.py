"""Backend selection (gfl_ops.available_backends / resolve_backend) and kernel registration."""

import pytest
import torch

import gfl_ops
import gfl_ops.verify
from gfl_ops import _ops, available_backends, resolve_backend
from _helpers import DEVICES, make_class_pred, make_generator, make_labels, make_scores


def _library_operators():
    """The public operators the compiled library registers (csrc/gfl_operators.h's
    AllOperators), the one C++ list the Python registry must match."""
    if not _ops.native_loaded():
        return ()
    schemas = torch._C._jit_get_all_schemas()
    names = {schema.name.removeprefix("gfl_ops::") for schema in schemas if schema.name.startswith("gfl_ops::")}
    return tuple(sorted(name for name in names if not name.startswith("_")))


OPERATORS = _ops.OPERATORS


def _has_kernel(operator, key, backend="native"):
    """Whether the kernel operator of `operator` on `backend` has a kernel for dispatch key `key`."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gfl_ops::_{operator}_{backend}", key)


def test_the_registry_is_the_library_s_operators():
    """An operator missing from the registry would be silently skipped: backend="auto"
    would fall back to the reference, a fake or a Triton kernel would be missing."""
    registered = _library_operators()
    if not registered:
        pytest.skip(f"the extension is not built: {_ops.NATIVE_IMPORT_ERROR}")
    assert "quality_focal_loss" in registered, registered  # the schema listing is read
    assert sorted(gfl_ops._registry.OPERATORS) == list(registered)
    assert sorted(_ops.OPERATORS) == list(registered)
    assert sorted({case.operator for case in gfl_ops.verify.cases()}) == list(registered)
    for operator in registered:
        for backend in ("native", "triton"):
            assert _has_fake(f"gfl_ops::_{operator}_{backend}"), (operator, backend)
        assert _has_fake(f"gfl_ops::{operator}"), operator


def _has_fake(qualified_name):
    return torch._library.simple_registry.singleton.find(qualified_name).fake_impl.kernel is not None


def test_kernel_contract_is_checked_at_registration():
    """The contract the autograd kernel relies on (csrc/gfl_registration.cpp) refuses, when
    an operator is defined, a kernel signature that would break it."""
    if not _ops.native_loaded():
        pytest.skip(f"the extension is not built: {_ops.NATIVE_IMPORT_ERROR}")
    check = torch.ops.gfl_ops._check_kernel_contract
    public = "(Tensor pred, Tensor? weight, float beta, str reduction, str backend) -> Tensor"
    check(public, "(Tensor pred, Tensor? weight, float beta, str reduction, bool compute_grad) -> (Tensor, Tensor)")
    broken = {
        "compute_grad": "(Tensor pred, Tensor? weight, float beta, str reduction) -> (Tensor, Tensor)",
        "weight": "(Tensor pred, Tensor? scale, float beta, str reduction, bool compute_grad) -> (Tensor, Tensor)",
        "beta": "(Tensor pred, Tensor? weight, str reduction, bool compute_grad) -> (Tensor, Tensor)",
        "`beta`": "(Tensor pred, Tensor? weight, int beta, str reduction, bool compute_grad) -> (Tensor, Tensor)",
        "reduction": "(Tensor pred, Tensor? weight, float beta, bool compute_grad) -> (Tensor, Tensor)",
        "pred": "(Tensor? weight, Tensor pred, float beta, str reduction, bool compute_grad) -> (Tensor, Tensor)",
        "(value, grad)": "(Tensor pred, Tensor? weight, float beta, str reduction, bool compute_grad) -> Tensor",
        "`bool compute_grad`": "(Tensor pred, Tensor? weight, float beta, str reduction, int compute_grad) -> "
        "(Tensor, Tensor)",
        "own argument `extra`": "(Tensor pred, Tensor? weight, float beta, str reduction, float extra, "
        "bool compute_grad) -> (Tensor, Tensor)",
        "`Tensor pred`": "(int pred, Tensor? weight, float beta, str reduction, bool compute_grad) -> (Tensor, Tensor)",
    }
    for problem, kernel_signature in broken.items():
        with pytest.raises(RuntimeError, match="breaks the kernel contract") as error:
            check(public, kernel_signature)
        assert problem in str(error.value), (problem, str(error.value))
    with pytest.raises(RuntimeError, match="grad_scale"):  # nowhere to put the backward pass's scale
        check("(Tensor pred, str backend) -> Tensor", "(Tensor pred, bool compute_grad) -> (Tensor, Tensor)")
    kernel = "(Tensor pred, Tensor? grad_scale, bool compute_grad) -> (Tensor, Tensor)"
    check("(Tensor pred, str backend) -> Tensor", kernel)
    for public in ("(Tensor pred, int backend) -> Tensor", "(Tensor pred, str backend) -> int"):
        with pytest.raises(RuntimeError, match="`str backend` and return one Tensor"):
            check(public, kernel)


def test_arguments_by_name_refuse_a_missing_argument_that_is_not_trailing():
    """positional() leaves out the public operator's trailing backend, and refuses to shift
    the arguments after a missing one into its place."""
    sample = dict(gfl_ops._registry.OPERATORS["varifocal_loss"].samples("cpu", torch.float32, False)[0])
    assert len(gfl_ops._registry.positional("gfl_ops", "varifocal_loss", sample)) == 11  # all but backend
    del sample["score"]
    with pytest.raises(ValueError, match=r"\['score', 'backend'\] are missing"):
        gfl_ops._registry.positional("gfl_ops", "varifocal_loss", sample)


def test_native_extension_loaded_with_cpu_kernels():
    assert _ops.native_loaded(), _ops.NATIVE_IMPORT_ERROR
    for operator in OPERATORS:
        assert hasattr(torch.ops.gfl_ops, operator)
        assert _has_kernel(operator, "CPU"), operator


@pytest.mark.parametrize("operator", OPERATORS)
def test_available_backends_on_cpu(operator):
    backends = available_backends("cpu", operator)
    assert "native" in backends and "reference" in backends
    assert backends[0] == "native"  # fastest first
    assert backends == available_backends(torch.device("cpu"), operator)
    assert available_backends(None, operator) == backends


@pytest.mark.parametrize("operator", OPERATORS)
def test_resolve_backend_on_cpu(operator):
    assert resolve_backend("auto", "cpu", operator) == "native"
    assert resolve_backend("native", "cpu", operator) == "native"
    assert resolve_backend("reference", "cpu", operator) == "reference"


def test_resolve_backend_errors():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        resolve_backend("nonsense", "cpu")
    with pytest.raises(
        ValueError, match="backend 'native' is not available for quality_focal_loss on device type 'meta'"
    ):
        resolve_backend("native", "meta")
    if not gfl_ops.triton.INTERPRETER:
        with pytest.raises(ValueError, match="backend 'triton' is not available .* device type 'cpu'"):
            resolve_backend("triton", "cpu")


def test_reference_is_available_everywhere():
    for device in ("cpu", "cuda", "meta"):
        assert "reference" in available_backends(device)
        assert resolve_backend("reference", device) == "reference"


def test_cuda_availability_follows_the_dispatch_table():
    """native is offered on cuda exactly when the library registered CUDA kernels."""
    assert ("native" in available_backends("cuda")) == _has_kernel("quality_focal_loss", "CUDA")


def test_cuda_kernels_registered_for_every_operator():
    if not _has_kernel("quality_focal_loss", "CUDA"):
        pytest.skip("gfl_ops._C was built without CUDA kernels (no nvcc / CPU-only build)")
    missing = [operator for operator in OPERATORS if not _has_kernel(operator, "CUDA")]
    assert not missing, f"CUDA kernels missing for {missing}"
    for operator in OPERATORS:
        assert "native" in available_backends("cuda", operator)


def test_triton_operators_registered_when_triton_imports():
    if gfl_ops.triton.IMPORT_ERROR is not None:
        pytest.skip(f"Triton does not import here: {gfl_ops.triton.IMPORT_ERROR}")
    for operator in OPERATORS:
        assert _has_kernel(operator, "CUDA", "triton"), operator
        assert _has_kernel(operator, "CPU", "triton") == gfl_ops.triton.INTERPRETER, operator
    assert gfl_ops.triton.available("cuda")
    assert gfl_ops.triton.available("cpu") == gfl_ops.triton.INTERPRETER


@pytest.mark.parametrize("device", DEVICES)
def test_auto_backend_runs_native(device):
    """backend="auto" gives exactly the native result (bit for bit), not the reference's."""
    gen = make_generator("auto")
    pred = make_class_pred("contiguous", 9, 7, torch.float32, device, gen)
    label = make_labels((9,), 7, gen, device)
    score = make_scores((9,), torch.float32, gen, device)
    auto = gfl_ops.quality_focal_loss(pred, label, score, reduction="none")
    native = gfl_ops.quality_focal_loss(pred, label, score, reduction="none", backend="native")
    assert torch.equal(auto, native)
    assert resolve_backend("auto", device) == "native"


@pytest.mark.parametrize("device", DEVICES)
def test_native_and_reference_agree_on_device(device):
    """A quick cross-backend check on each device (the full matrix is in test_parity_*.py)."""
    gen = make_generator("device-agree")
    pred = make_class_pred("channels_last", (2, 3, 4), 5, torch.float32, device, gen)
    label = make_labels((2, 3, 4), 5, gen, device)
    score = make_scores((2, 3, 4), torch.float32, gen, device)
    a = gfl_ops.quality_focal_loss(pred, label, score, backend="native")
    b = gfl_ops.quality_focal_loss(pred, label, score, backend="reference")
    assert a.device.type == device
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

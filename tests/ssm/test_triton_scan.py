"""The Triton scan (forward and backward) against the float64 reference.

On CPU the kernels run in Triton's interpreter, which is only chosen when ``TRITON_INTERPRET=1``
is set before Triton is imported. Another test may already have imported Triton (and this
module's kernels) in the pytest process, so the interpreter checks run in one subprocess
(``python -m tests.ssm.test_triton_scan CASES``) that reports the errors of every case as JSON.
On a machine with CUDA, the compiled kernels are checked in-process as well.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch

from .scan_cases import make_inputs

REPO = Path(__file__).resolve().parents[2]

# Each case: make_inputs arguments, scan flags, how to call the kernel, which inputs get gradients,
# and what the loss uses. "chunk"/"block_d" call triton_selective_scan directly (B/C grouped);
# otherwise the public selective_scan(backend="triton") is used.
CASES = {
    # everything on; two channel blocks per group (atomic dB/dC sums); 3 chunks, the last ragged
    "full_grouped": dict(make=dict(batch=2, dim=4, length=7, n=3, groups=2), softplus=True, last=True,
                         chunk=3, block_d=1),
    # the same with per-block dB/dC buffers (deterministic=True)
    "full_grouped_deterministic": dict(make=dict(batch=2, dim=4, length=7, n=3, groups=2), softplus=True,
                                       last=True, chunk=3, block_d=1, deterministic=True),
    # 3 channels per group padded to 4, N=5 padded to 8; L=9 in chunks of 4
    "padded": dict(make=dict(batch=1, dim=6, length=9, n=5, groups=2), softplus=True, last=False,
                   chunk=4, block_d=None),
    # ungrouped 3-D B/C through the public API; no D, z, delta_bias or softplus; also under no_grad
    "bare_public": dict(make=dict(batch=2, dim=3, length=10, n=3, groups=None, with_D=False, with_z=False,
                                  with_bias=False), softplus=False, last=False, no_grad_too=True),
    "L1_full": dict(make=dict(batch=1, dim=4, length=1, n=3, groups=1), softplus=True, last=True,
                    chunk=4, block_d=None),
    "L1_bare_public": dict(make=dict(batch=1, dim=2, length=1, n=2, groups=None, with_D=False, with_z=False,
                                     with_bias=False), softplus=False, last=True),
    # one group per channel, some inputs without gradient, a loss on the last state only
    "last_state_only": dict(make=dict(batch=1, dim=2, length=5, n=4, groups=2), softplus=True, last=True,
                            chunk=2, block_d=None, grad=("u", "delta", "B", "delta_bias"), loss="last"),
    # |delta| up to ~30 reaches both tails of softplus
    "softplus_tails": dict(make=dict(batch=1, dim=4, length=6, n=3, groups=1, delta_scale=15.0),
                           softplus=True, last=True, chunk=4, block_d=None),
    # float64 inputs: the kernel accumulates in float64
    "float64": dict(make=dict(batch=1, dim=4, length=6, n=3, groups=2), softplus=True, last=True,
                    chunk=4, block_d=2, dtype="float64"),
}
ALL_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# The error Triton 3.6's interpreter raises for `range(n)` over a kernel's scalar argument.
INTERPRETER_SCALAR_BUG = "only 0-dimensional arrays can be converted to Python scalars"


def run_case(spec: dict, device: str = "cpu", seed: int = 0) -> dict[str, float]:
    """Relative max errors (``max|x - ref| / max|ref|``) of outputs and gradients for one case."""
    from medssm.ssm import selective_scan
    from medssm.ssm.triton_scan import triton_selective_scan

    gen = torch.Generator().manual_seed(seed)
    ref_in = {k: (None if v is None else v.to(device)) for k, v in make_inputs(generator=gen, **spec["make"]).items()}
    dtype = getattr(torch, spec.get("dtype", "float32"))
    wanted = [k for k in spec.get("grad", ALL_INPUTS) if ref_in[k] is not None]
    for k in wanted:
        ref_in[k].requires_grad_(True)
    tri_in = {k: None if v is None else v.detach().to(dtype).requires_grad_(k in wanted) for k, v in ref_in.items()}
    flags = dict(delta_softplus=spec["softplus"], return_last_state=spec["last"])

    def call(inputs):
        if "chunk" in spec:
            return triton_selective_scan(**inputs, **flags, chunk=spec["chunk"], block_d=spec["block_d"],
                                         deterministic=spec.get("deterministic"))
        return selective_scan(**inputs, **flags, backend="triton")

    ref = selective_scan(**ref_in, **flags, backend="reference")
    tri = call(tri_in)
    ref_out, ref_last = ref if spec["last"] else (ref, None)
    tri_out, tri_last = tri if spec["last"] else (tri, None)
    assert tri_out.dtype == dtype and tri_out.shape == ref_out.shape

    def rel(x, r):
        return ((x.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-30)).item()

    errors = {"out": rel(tri_out, ref_out)}
    if spec["last"]:
        errors["last_state"] = rel(tri_last, ref_last)
    if spec.get("no_grad_too"):
        with torch.no_grad():
            errors["out_no_grad"] = rel(call(tri_in), ref_out)
    w_out = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64).to(device)
    ref_loss = 0.0 if spec.get("loss") == "last" else (ref_out * w_out).sum()
    tri_loss = 0.0 if spec.get("loss") == "last" else (tri_out * w_out.to(dtype)).sum()
    if spec["last"]:
        w_last = torch.randn(ref_last.shape, generator=gen, dtype=torch.float64).to(device)
        ref_loss = ref_loss + (ref_last * w_last).sum()
        tri_loss = tri_loss + (tri_last * w_last.to(dtype)).sum()
    ref_grads = torch.autograd.grad(ref_loss, [ref_in[k] for k in wanted])
    tri_grads = torch.autograd.grad(tri_loss, [tri_in[k] for k in wanted])
    for k, gt, gr in zip(wanted, tri_grads, ref_grads):
        assert gt.shape == gr.shape and gt.dtype == dtype, k
        errors["grad_" + k] = rel(gt, gr)
    return errors


def expected_keys(spec: dict) -> set[str]:
    """The error keys ``run_case`` must report for ``spec``."""
    optional = {"D": "with_D", "z": "with_z", "delta_bias": "with_bias"}
    present = {k for k in ALL_INPUTS if spec["make"].get(optional.get(k, ""), True)}
    keys = {"out"} | ({"last_state"} if spec["last"] else set())
    keys |= {"out_no_grad"} if spec.get("no_grad_too") else set()
    return keys | {"grad_" + k for k in spec.get("grad", ALL_INPUTS) if k in present}


def tolerances(spec: dict) -> tuple[float, float]:
    """(outputs, gradients): float32 kernels against the float64 reference, or float64 against it."""
    return (1e-10, 1e-9) if spec.get("dtype") == "float64" else (1e-5, 1e-4)


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "tests.ssm.test_triton_scan", *CASES], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_interpreter_matches_reference(interpreter_results, case):
    spec, result = CASES[case], interpreter_results[case]
    if INTERPRETER_SCALAR_BUG in result.get("error", ""):
        pytest.skip("this Triton's interpreter cannot take a loop bound from a scalar argument "
                    "(seen with Triton 3.6 and NumPy 2.5; Triton 3.7 runs these cases)")
    assert "error" not in result, result.get("error")
    assert set(result) == expected_keys(spec)
    tol_out, tol_grad = tolerances(spec)
    for key, err in result.items():
        assert err <= (tol_grad if key.startswith("grad_") else tol_out), (key, err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled kernels)")
@pytest.mark.parametrize("case", list(CASES) + ["gpu_sized", "gpu_sized_grouped"])
def test_gpu_matches_reference(case):
    pytest.importorskip("triton")
    spec = CASES.get(case) or dict(
        make=dict(batch=2, dim=96, length=300, n=16, groups=1 if case == "gpu_sized" else 4),
        softplus=True, last=True, chunk=64, block_d=None)
    tol_out, tol_grad = tolerances(spec)
    for key, err in run_case(spec, device="cuda").items():
        assert err <= (tol_grad if key.startswith("grad_") else tol_out), (key, err)


def test_cpu_tensors_need_the_interpreter():
    pytest.importorskip("triton")
    from medssm.ssm.backends import resolve_backend
    from medssm.ssm import triton_scan

    kw = make_inputs(dtype=torch.float32, groups=1)
    with warnings.catch_warnings():  # the front end may warn that the fused CPU scan is missing
        warnings.simplefilter("ignore")
        assert resolve_backend("auto", kw["u"]) != "triton"  # auto never picks it off CUDA
    if triton_scan._INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 in this process: CPU tensors are allowed")
    with pytest.raises(RuntimeError, match="CUDA"):
        triton_scan.triton_selective_scan(**kw)


def test_module_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
            "import medssm.ssm.triton_scan as t\n"
            "from medssm.ssm.backends import available_backends\n"
            "assert t.triton is None and isinstance(t.TRITON_IMPORT_ERROR, ImportError)\n"
            "assert 'triton' not in available_backends(), available_backends()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _main(names: list[str]) -> None:
    """Subprocess entry point: run the named cases (in the interpreter), print JSON on the last line."""
    torch.set_num_threads(1)
    import medssm.ssm.triton_scan as triton_scan

    assert triton_scan._INTERPRETED, "TRITON_INTERPRET=1 must be set before Triton is imported"
    results = {}
    for i, name in enumerate(names):
        try:
            results[name] = run_case(CASES[name], seed=i)
        except Exception:  # report it against the case; the other cases still run
            results[name] = {"error": traceback.format_exc()}
    print(json.dumps(results))


if __name__ == "__main__":
    _main(sys.argv[1:])

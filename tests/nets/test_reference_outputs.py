"""Every medssm network computes what it computed before the fused Mamba path (commit 7158869):
outputs on fixed weights and inputs (float64) within 1e-5 of those saved by make_reference_outputs.py."""

import pytest
import torch

from .make_reference_outputs import REFERENCE, cases, model_outputs, summary

CASES = cases()


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(REFERENCE)


def test_every_model_has_a_reference(reference):
    saved = {key.split("/")[0] + "/" + key.split("/")[1] for key in reference}
    assert saved == {f"{name}/{dims}d" for name, dims in CASES}, "rerun make_reference_outputs.py for a new model"


@pytest.mark.parametrize("name,dims", CASES, ids=[f"{n}-{d}d" for n, d in CASES])
def test_output_unchanged(name, dims, reference):
    for part, value in summary(model_outputs(name, dims)).items():
        expected = reference[f"{name}/{dims}d/{part}"]
        if part.endswith("sum_squares"):
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=0, msg=f"{name} {dims}D {part}")
        else:
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5, msg=f"{name} {dims}D {part}")

"""The planner's --gpu: an exact label first, the SXM part for a bare model name, and the known
labels listed when nothing (or too much) matches."""

import pytest

from arbor_titan.estimate.throughput import gpu_peak, match_gpu


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("H200", "NVIDIA H200 SXM"),  # not the NVL part, which a substring match found first
        ("h100", "NVIDIA H100 SXM"),  # not the PCIe part
        ("H200 NVL", "NVIDIA H200 NVL"),
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
        ("a100", "NVIDIA A100"),
        ("A10G", "NVIDIA A10G"),
        ("4090", "NVIDIA RTX 4090"),
    ],
)
def test_names_match_their_gpu(name, label):
    assert match_gpu(name).label == label


def test_the_peak_follows_the_compute_dtype():
    assert gpu_peak("H200", "bfloat16") == (989.4e12, "NVIDIA H200 SXM table, bf16 dense")
    assert gpu_peak("H200 NVL", "float32") == (417.5e12, "NVIDIA H200 NVL table, tf32 dense")


@pytest.mark.parametrize(("name", "what"), [("A10", "no known GPU"), ("NVIDIA", "several")])
def test_a_miss_lists_the_known_gpus(name, what):
    with pytest.raises(ValueError, match=what) as error:
        match_gpu(name)
    assert "known: A100, H100 PCIe, H100 SXM, H200 NVL, H200 SXM" in str(error.value)
    assert "--peak-tflops" in str(error.value)

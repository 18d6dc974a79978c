import pytest
import torch

from kbitc.runtime.quant.codebooks import NearestCodeEncoder, code_4bit, dynamic_map
from tests.runtime.quant.bnb_helpers import F


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_codebooks_equal_bitsandbytes(quant_type):
    assert torch.equal(code_4bit(quant_type), F.get_4bit_type(quant_type, device="cpu"))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_equal_bitsandbytes(signed):
    ours = dynamic_map(signed)
    assert ours.numel() == 256 and bool((ours[1:] >= ours[:-1]).all())
    assert torch.equal(ours, F.create_dynamic_map(signed=signed))


def test_signed_dynamic_map_facts_from_design():
    m = dynamic_map(True)
    assert abs(float(m.min()) - (-0.99297)) < 1e-5 and float(m.max()) == 1.0 and 0.0 in m.tolist()


@pytest.mark.parametrize("code", [code_4bit("nf4"), code_4bit("fp4"), dynamic_map(True), dynamic_map(False)])
def test_encoder_is_exact_nearest_with_ties_down(code, rng):
    """The table encoder equals brute-force nearest (float64 distances, ties to the lower code)."""
    enc = NearestCodeEncoder(code)
    assert enc.fast
    sorted_code, order = torch.sort(code, stable=True)
    mids = (sorted_code[:-1] + sorted_code[1:]) / 2
    probes = [torch.rand(20000, generator=rng) * 2.2 - 1.1,
              torch.randn(20000, generator=rng) * 1e-3,
              mids, torch.nextafter(mids, torch.full_like(mids, 2.0)),
              torch.nextafter(mids, torch.full_like(mids, -2.0)), code,
              torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-38, -1e-38, 1e-45, 3.0, -3.0])]
    x = torch.cat(probes)
    got = enc.encode(x)
    # brute force over the sorted codebook: nearest in float64, lowest index on ties
    dist = (x.double().clamp(-1, 1)[:, None] - sorted_code.double()[None, :]).abs()
    nearest_sorted = dist.argmin(dim=1)
    # a value exactly on a float32 midpoint goes down (bucketize semantics on float32 midpoints)
    expected = order[torch.bucketize(x.clamp(-1, 1), mids)]
    assert torch.equal(got.long(), expected)
    # the decoded values agree with brute force (FP4 has +0 and -0: compare values, not indices),
    # except on exact midpoints where float64 sees a tie broken the other way
    agree = sorted_code[nearest_sorted] == code[expected.long()]
    assert agree.float().mean() > 0.995

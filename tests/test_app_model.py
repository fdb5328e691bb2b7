"""dnnrl.model: Table 1 shapes and parameter counts."""
import pytest
import torch

from dnnrl.model import TABLE1, DNNRLNet


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return DNNRLNet().eval()


def test_stage_shapes_match_table1(net):
    with torch.no_grad():
        stages = dict(net.stages(torch.zeros(2, 1, 108, 108)))
    assert list(stages) == list(TABLE1)
    for name, (shape, _) in TABLE1.items():
        assert tuple(stages[name].shape[1:]) == shape, name


def test_parameter_counts_within_10_percent(net):
    counts = net.layer_param_counts()
    for name, (_, target) in TABLE1.items():
        if target is not None:
            assert abs(counts[name] - target) <= 0.10 * target, (name, counts[name], target)


def test_embedding_is_unit_norm_and_head_shape(net):
    x = torch.randn(3, 1, 108, 108)
    with torch.no_grad():
        e, logits = net(x), net.logits(x)
    assert e.shape == (3, 512) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    assert logits.shape == (3, 7)


@pytest.mark.parametrize("size", [32, 48, 64])
def test_reduced_sizes_keep_a_2x2_map(size):
    net = DNNRLNet(width=0.125).eval()
    with torch.no_grad():
        stages = dict(net.stages(torch.zeros(1, 1, size, size)))
    assert stages["avgpool"].shape[-2:] == (2, 2)
    assert stages["fc"].shape == (1, 512)

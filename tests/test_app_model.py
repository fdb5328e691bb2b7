"""dnnrl.model: Table 1 shapes and parameter counts; the inference copy with folded batch norms."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dnnrl.model import TABLE1, DNNRLNet, fold_batch_norm
from dnnrl.runtime import use_channels_last


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
    # the joint loss's single pass gives the same two, the embeddings unit-norm too
    with torch.no_grad():
        je, jl = net.embed_and_logits(x)
    torch.testing.assert_close(je, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(jl, logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [32, 48, 64])
def test_reduced_sizes_keep_a_2x2_map(size):
    net = DNNRLNet(width=0.125).eval()
    with torch.no_grad():
        stages = dict(net.stages(torch.zeros(1, 1, size, size)))
    assert stages["avgpool"].shape[-2:] == (2, 2)
    assert stages["fc"].shape == (1, 512)


def _randomise_batch_norms(net, seed):
    """Running statistics and affine parameters far from their initial (identity) values."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.05)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)


@given(width=st.sampled_from([0.125, 0.25]), size=st.sampled_from([32, 48, 57]),
       batch=st.integers(1, 5), channels_last=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2 ** 16))
def test_folded_batch_norms_compute_the_eval_network(width, size, batch, channels_last, dtype, seed):
    torch.manual_seed(seed)
    net = DNNRLNet(width=width).to(dtype)
    _randomise_batch_norms(net, seed)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = fold_batch_norm(net)
    assert net.training  # the original keeps its mode and its weights
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not folded.training and folded.batch_norm_folded
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert folded.conv2[0].weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    net.eval()
    x = torch.randn(batch, 1, size, size, dtype=dtype)
    eps = 1e-5 if dtype == torch.float32 else 1e-12
    with torch.no_grad():
        for name in ("features", "forward", "logits"):
            want, got = getattr(net, name)(x), getattr(folded, name)(x)
            # rounding error scales with the whole output, not with each (possibly tiny) element:
            # a seed's random batch norms left one feature at 2e-3 next to features of 1, 1.3e-5 off
            torch.testing.assert_close(got, want, rtol=eps, atol=eps * float(want.abs().max()), msg=name)


def test_a_folded_network_can_be_evaluated_but_not_trained():
    folded = fold_batch_norm(DNNRLNet(width=0.125))
    folded.eval()
    folded.train(False)
    with pytest.raises(RuntimeError, match="folded into its convolutions"):
        folded.train()
    # folding again is a no-op copy
    again = fold_batch_norm(folded)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), folded(x), rtol=0, atol=0)


def test_channels_last_is_the_default_on_cuda_and_the_cpu_only():
    assert use_channels_last("auto", torch.device("cpu"))
    assert use_channels_last("auto", torch.device("cuda", 0))
    assert not use_channels_last("auto", torch.device("mps"))
    assert not use_channels_last("off", torch.device("cpu")) and use_channels_last("on", torch.device("mps"))
    assert use_channels_last(True, torch.device("meta")) and not use_channels_last(False, torch.device("cpu"))

"""StructToken head: parameter count from an independent formula, structure, layers vs. NCHW definitions."""
import pytest
import torch
import torch.nn.functional as F

import structtoken_d2  # noqa: F401  (registrations)
from structtoken_d2.modeling import EXTRACTION_REGISTRY, StructTokenHead
from structtoken_d2.modeling.layers import Conv1x1, DepthwiseProjection, GroupConvFFN, ResBlock


# ----------------------------------------------------------------------------- independent count
# Written from the description of the authors' modules (1x1 convs with bias, LayerNorms with
# weight + bias, 3x3 depthwise / group convs with bias), not from structtoken_d2's code.
def projection_params(n_in, n_out):  # DepthWiseConvBlock(n_in, n_out)
    return (n_in * n_in + n_in) + 2 * n_in + (9 * n_in + n_in) + 2 * n_in + (n_in * n_out + n_out) + 2 * n_out


def ffn_params(d, r=4):  # GroupConvBlock(d, r): 1x1 d->rd, LN, 3x3 rd->rd groups=d (r in-channels each), LN, 1x1 rd->d, LN
    h = r * d
    return (d * h + h) + 2 * h + (h * r * 9 + h) + 2 * h + (h * d + d) + 2 * d


def resblock_params(k):  # LN, 3x3 conv k->k, LN, 3x3 conv k->k
    return 2 * k + (k * k * 9 + k) + 2 * k + (k * k * 9 + k)


def block_params(variant, c, k, last):
    if variant == "CSE":
        return 2 * projection_params(k, k) + 2 * projection_params(c, c) + ffn_params(k) + (0 if last else ffn_params(c))
    g = c + k
    if variant == "SSE":
        return 4 * projection_params(g, g) + ffn_params(g)
    return 2 * projection_params(g, g) + (g * g + g) + ffn_params(g)  # PWE: + 1x1 conv with bias


def head_params(variant, c, k, token_hw, blocks=4):
    dec_proj = c * c + c
    tokens = k * token_hw[0] * token_hw[1]
    return dec_proj + tokens + sum(block_params(variant, c, k, i == blocks - 1) for i in range(blocks)) + resblock_params(k)


def make_head(variant="CSE", c=192, k=150, token=(32, 32), blocks=4, **kw):
    return StructTokenHead(in_feature="last_feat", in_channels=c, num_classes=k, variant=variant,
                           num_blocks=blocks, token_size=token, **kw)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_cse_vit_t_head_matches_independent_count():
    head = make_head("CSE", c=192, k=150, token=(32, 32))
    assert n_params(head) == head_params("CSE", 192, 150, (32, 32)) == 3_401_460


@pytest.mark.parametrize("variant", ["CSE", "SSE", "PWE"])
@pytest.mark.parametrize("c,k,token", [(192, 150, (32, 32)), (1024, 19, (48, 48))])
def test_every_variant_matches_independent_count(variant, c, k, token):
    with torch.device("meta"):  # ViT-L-sized heads without allocating them
        head = make_head(variant, c=c, k=k, token=token)
    assert n_params(head) == head_params(variant, c, k, token)


# ----------------------------------------------------------------------------- structure
def test_logits_have_k_channels_at_feature_size_and_tokens_are_resized():
    head = make_head("CSE", c=16, k=5, token=(4, 4), blocks=2).eval()
    feature = torch.randn(2, 16, 5, 7)
    out = head({"last_feat": feature})
    assert out.shape == (2, 5, 5, 7)
    assert head.structure_tokens((4, 4)) is head.tokens
    resized = head.structure_tokens((5, 7))
    expected = F.interpolate(head.tokens, size=(5, 7), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized, expected)


def test_odd_token_grid_resizes_with_align_corners():
    head = make_head("CSE", c=8, k=3, token=(5, 4), blocks=1)
    expected = F.interpolate(head.tokens, size=(6, 6), mode="bicubic", align_corners=True)
    torch.testing.assert_close(head.structure_tokens((6, 6)), expected)


def test_drop_path_is_linear_over_blocks_and_last_cse_block_has_no_feature_ffn():
    head = make_head("CSE", c=16, k=5, token=(4, 4), blocks=4, drop_path_rate=0.3)
    rates = [getattr(layer.ffn1.drop_path, "drop_prob", 0.0) for layer in head.layers]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert [layer.ffn2 is None for layer in head.layers] == [False, False, False, True]
    for variant in ("SSE", "PWE"):  # one FFN over the concatenation in every block
        head = make_head(variant, c=16, k=5, token=(4, 4), blocks=2)
        assert all(layer.ffn1.pwconv1.in_features == 21 for layer in head.layers)


def test_unknown_variant_lists_the_valid_ones():
    assert {name for name, _ in EXTRACTION_REGISTRY} == {"CSE", "SSE", "PWE"}
    with pytest.raises(ValueError, match=r"'XSE'.*CSE, PWE, SSE"):
        make_head("XSE", c=16, k=5, token=(4, 4))


def test_attention_scale_modes():
    torch.manual_seed(0)
    spatial = make_head("CSE", c=16, k=5, token=(4, 4), blocks=1, attn_scale="spatial").eval()
    channel = make_head("CSE", c=16, k=5, token=(4, 4), blocks=1, attn_scale="channel").eval()
    channel.load_state_dict(spatial.state_dict())
    feature = {"last_feat": torch.randn(1, 16, 4, 5)}  # N = 20 != C = 16: different scales
    assert not torch.allclose(spatial(feature), channel(feature))
    with pytest.raises(ValueError, match="ATTN_SCALE"):
        make_head("CSE", c=16, k=5, token=(4, 4), attn_scale="bogus")


def test_initialisation_follows_the_authors():
    torch.manual_seed(0)
    head = make_head("CSE", c=64, k=32, token=(8, 8), blocks=1)
    assert head.tokens.abs().max() <= 2.0 and 0.015 < head.tokens.std() < 0.025
    conv = head.layers[0].ffn1.pwconv1  # Conv1x1 stands for a 1x1 Conv2d: Kaiming normal, fan-in
    assert isinstance(conv, Conv1x1)
    assert conv.weight.std().item() == pytest.approx((2.0 / conv.in_features) ** 0.5, rel=0.1)
    assert torch.all(conv.bias == 0)
    norm = head.layers[0].cross_attn.query_map.norm1
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


# ----------------------------------------------------------------------------- layers vs NCHW definitions
def _ln_nchw(x, norm):
    return F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)


def _conv1x1_nchw(x, lin):
    return F.conv2d(x, lin.weight[:, :, None, None], lin.bias)


def _randomise(module):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


def test_depthwise_projection_equals_the_authors_nchw_block():
    proj = DepthwiseProjection(6, 4)
    _randomise(proj)
    x = torch.randn(2, 6, 5, 7)
    y = _ln_nchw(_conv1x1_nchw(x, proj.conv1), proj.norm1)
    y = F.gelu(y)
    y = F.gelu(_ln_nchw(F.conv2d(y, proj.conv2.weight, proj.conv2.bias, padding=1, groups=6), proj.norm2))
    y = _ln_nchw(_conv1x1_nchw(y, proj.conv3), proj.norm3)
    torch.testing.assert_close(proj(x.permute(0, 2, 3, 1)), y.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-5)


def test_group_conv_ffn_equals_the_authors_nchw_block():
    ffn = GroupConvFFN(3, expand_ratio=4).eval()
    _randomise(ffn)
    x = torch.randn(2, 3, 5, 4)
    y = F.gelu(_ln_nchw(_conv1x1_nchw(x, ffn.pwconv1), ffn.norm1))
    y = F.gelu(_ln_nchw(F.conv2d(y, ffn.dwconv.weight, ffn.dwconv.bias, padding=1, groups=3), ffn.norm2))
    y = F.gelu(x + _ln_nchw(_conv1x1_nchw(y, ffn.pwconv2), ffn.norm3))
    assert ffn.dwconv.weight.shape == (12, 4, 3, 3)
    torch.testing.assert_close(ffn(x.permute(0, 2, 3, 1)), y.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-5)


def test_resblock_is_pre_activation_with_identity():
    block = ResBlock(4, 4)
    _randomise(block)
    x = torch.randn(1, 4, 6, 5)
    y = F.conv2d(F.gelu(_ln_nchw(x, block.norm1)), block.conv1.weight, block.conv1.bias, padding=1)
    y = F.conv2d(F.gelu(_ln_nchw(y, block.norm2)), block.conv2.weight, block.conv2.bias, padding=1) + x
    torch.testing.assert_close(block(x.permute(0, 2, 3, 1)), y, atol=1e-5, rtol=1e-5)

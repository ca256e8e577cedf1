"""TimmViT backbone: output layout, equality with timm, local weight loading with pos-embed resizing."""
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import structtoken_d2  # noqa: F401  (registrations)
from detectron2.modeling import BACKBONE_REGISTRY
from structtoken_d2.modeling import CheckpointMismatchError, TimmViT
from structtoken_d2.modeling.backbone.vit import patch_tokens

ARCH = dict(embed_dim=32, depth=2, num_heads=2)  # a tiny vit_tiny_patch16_384


def make_backbone(img_size=(64, 64), **kw):
    kw.setdefault("drop_path_rate", 0.0)
    return TimmViT(name="vit_tiny_patch16_384", img_size=img_size, **ARCH, **kw).eval()


def make_timm(img_size, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_384", pretrained=False, img_size=img_size, num_classes=0, **ARCH)
    with torch.no_grad():  # timm zero-initialises some tensors: make every one informative
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def timm_last_block(model, x, norm=False):
    """timm's own output of the last block, class token removed, NCHW."""
    if norm:
        tokens = model.forward_features(x)[:, model.num_prefix_tokens:]
        h, w = x.shape[-2] // 16, x.shape[-1] // 16
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)
    return model.forward_intermediates(x, indices=1, norm=False, output_fmt="NCHW", intermediates_only=True)[-1]


def bicubic_grid(pos_embed, src, dst):
    """Independent pos-embed resize: class token kept, grid bicubic with align_corners=False."""
    grid = pos_embed[:, 1:].reshape(1, src[0], src[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=dst, mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    return torch.cat((pos_embed[:, :1], grid), dim=1)


def test_registered_single_stride16_output_for_any_size():
    assert BACKBONE_REGISTRY.get("TimmViT") is TimmViT
    backbone = make_backbone()
    shape = backbone.output_shape()
    assert list(shape) == ["last_feat"] and shape["last_feat"].channels == 32 and shape["last_feat"].stride == 16
    assert backbone.size_divisibility == 16
    out = backbone(torch.randn(2, 3, 70, 45))["last_feat"]  # padded to 80 x 48
    assert out.shape == (2, 32, 5, 3)


def test_no_final_norm_by_default():
    assert isinstance(make_backbone().vit.norm, torch.nn.Identity)
    assert isinstance(make_backbone(final_norm=True).vit.norm, torch.nn.LayerNorm)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_weights_at_the_native_grid_give_timm_features(tmp_path, suffix):
    reference = make_timm((64, 64))
    path = str(tmp_path / f"vit{suffix}")
    state = reference.state_dict()
    torch.save(state, path) if suffix == ".pth" else save_file({k: v.contiguous() for k, v in state.items()}, path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = make_backbone(weights=path)(x)["last_feat"]
        torch.testing.assert_close(ours, timm_last_block(reference, x))
        ours_norm = make_backbone(weights=path, final_norm=True)(x)["last_feat"]
        torch.testing.assert_close(ours_norm, timm_last_block(reference, x, norm=True))


def test_pos_embed_resized_when_loading_and_at_run_time(tmp_path):
    source = make_timm((48, 48))  # a checkpoint with a 3x3 grid
    path = str(tmp_path / "vit48.pth")
    torch.save({"model": source.state_dict()}, path)  # wrapped, as some checkpoints are
    backbone = make_backbone(img_size=(64, 64), weights=path)  # 4x4 grid
    expected_pos = bicubic_grid(source.pos_embed.detach(), (3, 3), (4, 4))
    torch.testing.assert_close(backbone.vit.pos_embed.detach(), expected_pos)

    for size in [(64, 64), (80, 112)]:  # the built grid, and another input size
        reference = make_timm(size)
        reference.load_state_dict({**source.state_dict(), "pos_embed": bicubic_grid(expected_pos, (4, 4),
                                                                                     (size[0] // 16, size[1] // 16))})
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(backbone(x)["last_feat"], timm_last_block(reference, x))


def _to_augreg_npz(model, path):
    """Write a timm ViT in the big_vision / augreg .npz layout that timm's loader reads."""
    t = lambda v: v.detach().numpy()  # noqa: E731
    w = {"embedding/kernel": t(model.patch_embed.proj.weight).transpose(2, 3, 1, 0),
         "embedding/bias": t(model.patch_embed.proj.bias), "cls": t(model.cls_token),
         "Transformer/posembed_input/pos_embedding": t(model.pos_embed),
         "Transformer/encoder_norm/scale": t(model.norm.weight), "Transformer/encoder_norm/bias": t(model.norm.bias)}
    for i, blk in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = t(blk.norm1.weight), t(blk.norm1.bias)
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = t(blk.norm2.weight), t(blk.norm2.bias)
        for name, wq, bq in zip(("query", "key", "value"), blk.attn.qkv.weight.chunk(3), blk.attn.qkv.bias.chunk(3)):
            w[p + f"MultiHeadDotProductAttention_1/{name}/kernel"], w[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = t(wq).T, t(bq)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = t(blk.attn.proj.weight).T
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = t(blk.attn.proj.bias)
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"], w[p + f"MlpBlock_3/Dense_{r}/bias"] = t(fc.weight).T, t(fc.bias)
    np.savez(path, **w)


def test_augreg_npz_loads_like_the_same_weights_as_pth(tmp_path):
    source = make_timm((48, 48))
    npz, pth = str(tmp_path / "vit.npz"), str(tmp_path / "vit.pth")
    _to_augreg_npz(source, npz)
    torch.save(source.state_dict(), pth)
    from_npz, from_pth = make_backbone(weights=npz).state_dict(), make_backbone(weights=pth).state_dict()
    assert from_npz.keys() == from_pth.keys()
    for key in from_pth:
        torch.testing.assert_close(from_npz[key], from_pth[key], msg=key)


def test_missing_weight_file_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="MODEL.VIT.WEIGHTS.*nope.pth"):
        make_backbone(weights=missing)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    torch.manual_seed(0)
    deeper = timm.create_model("vit_tiny_patch16_384", pretrained=False, img_size=64, num_classes=0,
                               embed_dim=32, depth=3, num_heads=2)
    path = str(tmp_path / "deeper.pth")
    torch.save(deeper.state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \['blocks\.2"):
        make_backbone(weights=path)


def test_gradients_reach_the_backbone():
    backbone = make_backbone().train()
    backbone(torch.randn(1, 3, 40, 56))["last_feat"].square().mean().backward()
    assert backbone.vit.patch_embed.proj.weight.grad.abs().sum() > 0
    assert backbone.vit.pos_embed.grad.abs().sum() > 0


def test_patch_embedding_as_a_matrix_product_equals_the_convolution():
    # float64: the tokens and every gradient of the 16x16 / 16 patch embedding as F.conv2d computes them.
    torch.manual_seed(0)
    proj = torch.nn.Conv2d(3, 8, 16, stride=16).double()
    x = torch.randn(2, 3, 48, 32, dtype=torch.float64)
    upstream = torch.randn(2, 6, 8, dtype=torch.float64)
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    tokens, grid = patch_tokens(ours_x, proj)
    ref = F.conv2d(ref_x, proj.weight, proj.bias, stride=16)
    assert grid == (3, 2)
    torch.testing.assert_close(tokens, ref.flatten(2).transpose(1, 2), rtol=0, atol=1e-12)
    weight, bias = proj.weight.detach().clone().requires_grad_(), proj.bias.detach().clone().requires_grad_()
    F.conv2d(ref_x, weight, bias, stride=16).flatten(2).transpose(1, 2).backward(upstream)
    tokens.backward(upstream)
    pairs = ((ours_x.grad, ref_x.grad), (proj.weight.grad, weight.grad), (proj.bias.grad, bias.grad))
    for ours_grad, ref_grad in pairs:
        torch.testing.assert_close(ours_grad, ref_grad, rtol=0, atol=1e-12)


def test_overlapping_patch_embedding_runs_the_convolution():
    torch.manual_seed(0)
    proj = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1).double()
    x = torch.randn(1, 3, 10, 12, dtype=torch.float64)
    tokens, grid = patch_tokens(x, proj)
    assert grid == (5, 6)
    torch.testing.assert_close(tokens, proj(x).flatten(2).transpose(1, 2), rtol=0, atol=0)

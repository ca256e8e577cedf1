"""Token maps (paper Fig. 4) against independent hooks, their concentration by hand, the token-map
tool's outputs, prediction-panel legends, and the training curves."""
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import structtoken_d2  # noqa: F401
from structtoken_d2.data.datasets import shapes
from structtoken_d2.engine import Trainer
from structtoken_d2.evaluation import prediction_panel, shown_classes
from structtoken_d2.modeling.checkpoint import StructTokenCheckpointer
from structtoken_d2.visualization import (
    ConcentrationMeter,
    StageReadout,
    class_ious,
    inside_fractions,
    region_separation,
    load_metrics,
    metrics_figure,
    plot_metrics,
    predict_token_maps,
    token_map_figure,
)
from tiny_runs import SHAPES_CONFIG, load_tool, tiny_cfg, tiny_opts

NAN = math.nan

#: The tiny model with 2 blocks (2 x 2 learned tokens).
TWO_BLOCKS = {"MODEL.STRUCTTOKEN.NUM_BLOCKS": 2}


@pytest.fixture
def tiny_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setattr(shapes, "SHAPES_SPLITS", {"train": (2, 0), "val": (3, 1)})


# ------------------------------------------------------------------------------ token maps
def test_token_maps_are_the_heads_intermediate_tokens():
    torch.manual_seed(0)
    model = Trainer.build_model(tiny_cfg(TWO_BLOCKS)).eval()
    head = model.sem_seg_head
    seen = {}

    def keep(name, tensor):  # returns None: the hooks observe, they change nothing
        seen[name] = tensor.detach().clone()

    handles = [head.layers[0].register_forward_pre_hook(lambda m, args: keep("S", args[0]))]
    for i, layer in enumerate(head.layers, 1):
        handles.append(layer.register_forward_hook(lambda m, a, out, i=i: keep(f"S{i}", out[0])))
    handles.append(head.residual_block.register_forward_hook(lambda m, a, out: keep("Y", out)))
    handles.append(head.register_forward_pre_hook(lambda m, args: keep("F", args[0][m.in_feature])))
    # 40 x 56 pixels: padded to 48 x 64, a 3 x 4 token grid; the original image is 50 x 70.
    inputs = {"image": torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8), "height": 50, "width": 70}
    result = predict_token_maps(model, inputs, with_feature=True)
    for h in handles:
        h.remove()

    assert result.names == ["S", "S1", "S2", "Y"]
    # the 3 x 4 grid; S is the learned 2 x 2 tokens resized to it; the blocks pass tokens channels-last
    assert seen["S"].shape == (1, 3, 4, 6) and seen["S1"].shape == (1, 3, 4, 6) and seen["Y"].shape == (1, 6, 3, 4)
    assert (seen["S"] - seen["S1"]).abs().max() > 1e-2  # so that the comparison below tells the stages apart
    # At image size: upsampled to the padded 48 x 64, cropped to 40 x 56, resized to 50 x 70.
    grid64 = torch.stack([seen[n][0].permute(2, 0, 1) for n in ["S", "S1", "S2"]] + [seen["Y"][0]]).double()
    reference = F.interpolate(grid64, size=(48, 64), mode="bilinear", align_corners=False)[..., :40, :56]
    reference = F.interpolate(reference, size=(50, 70), mode="bilinear", align_corners=False)
    assert result.maps.shape == (4, 6, 50, 70)
    torch.testing.assert_close(result.maps.double(), reference, rtol=1e-5, atol=1e-5)
    # Y at image size is the pass's output logits.
    torch.testing.assert_close(result.maps[-1], result.logits, rtol=1e-5, atol=1e-5)
    # The backbone feature the head decoded (C = 32 channels), brought to the image the same way.
    feature = F.interpolate(seen["F"].double(), size=(48, 64), mode="bilinear", align_corners=False)[..., :40, :56]
    feature = F.interpolate(feature, size=(50, 70), mode="bilinear", align_corners=False)[0]
    assert result.feature.shape == (32, 50, 70)
    torch.testing.assert_close(result.feature.double(), feature, rtol=1e-5, atol=1e-5)
    assert predict_token_maps(model, inputs).feature is None


# ---------------------------------------------------------------------------- concentration
def test_inside_fractions_by_hand():
    gt = torch.tensor([[0, 0], [1, 255]])
    maps = torch.tensor([
        # stage 0: class 0 positives on the 3 labelled pixels 1, 0, 3 -> inside (row 0) 1 / 4;
        #          class 1 positives 2, 2, 2 -> inside (pixel (1, 0)) 2 / 6. The ignore pixel is left out.
        [[[1.0, -1.0], [3.0, 5.0]], [[2.0, 2.0], [2.0, -7.0]]],
        # stage 1: class 0 all negative -> NaN; class 1 all on its pixel -> 1.
        [[[-1.0, -1.0], [-1.0, 9.0]], [[0.0, 0.0], [4.0, 9.0]]],
    ])
    fractions = inside_fractions(maps, gt, 255)
    expected = torch.tensor([[0.25, 1 / 3], [NAN, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(fractions, expected, equal_nan=True)
    # Centred (labelled pixels only): stage 0 class 0: 1, -1, 3 minus 1 -> 0, -2, 2: inside 0 / 2 = 0;
    # class 1: 2, 2, 2 minus 2 -> 0: no positive mass, NaN; stage 1 class 0 likewise NaN;
    # class 1: 0, 0, 4 minus 4/3 -> positive only on its pixel: 1.
    centred = inside_fractions(maps, gt, 255, centred=True)
    torch.testing.assert_close(centred, torch.tensor([[0.0, NAN], [NAN, 1.0]], dtype=torch.float64), equal_nan=True)
    # A class absent from the ground truth gets NaN whatever its map.
    three = torch.cat([maps, maps[:, :1]], dim=1)
    assert inside_fractions(three, gt, 255)[:, 2].isnan().all()


def test_region_separation_by_hand():
    gt = torch.tensor([[0, 0], [1, 1], [1, 255]])
    maps = torch.tensor([
        # stage 0: class 0 region {3, 1} vs outside {2, 0, 5}: 3 beats 2 and 0, 1 beats 0 -> 3 of 6;
        #          class 1 constant -> every pair a tie -> 0.5. The ignore pixel (value 9) is left out.
        [[[3.0, 1.0], [2.0, 0.0], [5.0, 9.0]], [[4.0, 4.0], [4.0, 4.0], [4.0, -9.0]]],
        # stage 1: class 0 higher on its region than anywhere -> 1; class 1 lower everywhere on its
        #          region, with one tie (2 vs 2): outside {2, 3}, region {2, 1, 0} -> 0.5 of 6.
        [[[8.0, 7.0], [1.0, 1.0], [1.0, 0.0]], [[2.0, 3.0], [2.0, 1.0], [0.0, 9.0]]],
    ])
    expected = torch.tensor([[0.5, 0.5], [1.0, 0.5 / 6]], dtype=torch.float64)
    torch.testing.assert_close(region_separation(maps, gt, 255), expected)
    # A class absent, or covering every labelled pixel, gets NaN.
    three = torch.cat([maps, maps[:, :1]], dim=1)
    assert region_separation(three, gt, 255)[:, 2].isnan().all()
    assert region_separation(maps, torch.zeros(3, 2, dtype=torch.long), 255)[:, 0].isnan().all()


def test_region_separation_equals_counting_all_pairs():
    torch.manual_seed(0)
    gt = torch.randint(0, 3, (9, 7))
    gt[0, :3] = 255
    maps = torch.randint(-2, 3, (2, 3, 9, 7)).float()  # few values: many ties
    valid = gt != 255
    for s in range(2):
        for k in range(3):
            inside, outside = maps[s, k][valid & (gt == k)], maps[s, k][valid & (gt != k)]
            wins = (inside[:, None] > outside[None, :]).double().sum() + 0.5 * (inside[:, None] == outside[None, :]).double().sum()
            assert region_separation(maps, gt, 255)[s, k].item() == pytest.approx(wins.item() / (len(inside) * len(outside)))


def test_concentration_meter_averages_over_images_with_the_class():
    meter = ConcentrationMeter(["S", "Y"], ["a", "b"], 255)
    ones = torch.ones(2, 2, 2, 2)
    meter.add(ones, torch.tensor([[0, 0], [0, 1]]))  # even maps: a 3/4, b 1/4 (the areas)
    maps = ones.clone()
    maps[:, 1] = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    meter.add(maps, torch.tensor([[0, 0], [1, 1]]))  # a: even 1/2; b: all on (1, 1) -> 1
    meter.add(ones, torch.tensor([[0, 0], [0, 0]]))  # b absent: a 1, b not counted
    rows = {r["class"]: r for r in meter.summary()}
    assert rows["a"]["images"] == 3 and rows["b"]["images"] == 2
    assert rows["a"]["S"] == pytest.approx((0.75 + 0.5 + 1) / 3)
    assert rows["b"]["Y"] == pytest.approx((0.25 + 1) / 2)
    assert rows["b"]["area"] == pytest.approx((0.25 + 0.5) / 2)
    assert rows["mean"]["Y"] == pytest.approx(((0.75 + 0.5 + 1) / 3 + 0.625) / 2)
    assert rows["mean"]["images"] == 3


# ------------------------------------------------------------------------------- readout
def test_class_ious_by_hand():
    ious = class_ious(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 2]), 4)
    assert ious[:3].tolist() == [0.5, 0.5, 1.0] and math.isnan(ious[3])


def test_readout_reads_a_class_from_any_slice_and_nothing_from_noise():
    g = torch.Generator().manual_seed(0)
    readout = StageReadout(["own", "permuted", "noise"], ["a", "b", "c"], 255, pixels_per_image=150)
    for _ in range(6):
        gt = torch.randint(0, 3, (20, 20), generator=g)
        gt[0] = 255  # ignored pixels: never sampled (a label of 255 would fail the fit)
        own = F.one_hot(gt.clamp(max=2), 3).permute(2, 0, 1).double()  # slice k: 1 on class k
        permuted = own[[1, 2, 0]]  # slice k: 1 on class k + 1
        noisy = [m + 0.05 * torch.randn(m.shape, generator=g, dtype=torch.float64) for m in (own, permuted)]
        readout.add(noisy + [torch.randn(3, 20, 20, generator=g)], gt)
    rows = {r["class"]: r for r in readout.summary()}
    assert rows["mean"]["images"] == 3  # images 2, 4 and 6 are scored, 1, 3 and 5 fitted
    for name in "abc":
        assert rows[name]["own"] == 1.0 and rows[name]["permuted"] == 1.0
        assert rows[name]["noise"] < 0.45  # 3 balanced classes: a guess scores about 1/3 / (2 - 1/3) = 0.2
        assert abs(rows[name]["area"] - 1 / 3) < 0.1
    # The permuted slices do not mark out their own classes: what the readout adds to the separation.
    assert (region_separation(permuted[None], gt, 255)[0] < 0.5).all()
    with pytest.raises(ValueError, match="2 labelled images or more"):
        StageReadout(["own"], ["a"], 255).summary()
    with pytest.raises(ValueError, match=r"stage own: maps of size \(10, 20\) for a label of size \(20, 20\)"):
        StageReadout(["own"], ["a", "b", "c"], 255).add([own[:, :10]], gt)


# ------------------------------------------------------------------------- the token tool
def test_visualize_tokens_writes_figures_and_measurements_without_overwriting(tiny_shapes, tmp_path, capsys):
    cfg = tiny_cfg(TWO_BLOCKS)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    StructTokenCheckpointer(model, save_dir=str(tmp_path)).save("tiny")
    tool = load_tool("visualize_tokens")
    out = tmp_path / "maps"
    out.mkdir()
    (out / "00000_tokens.png").write_bytes(b"not mine")  # an existing file is never written over
    argv = ["--config-file", str(SHAPES_CONFIG), "--dataset", "shapes_sem_seg_val", "--num", "2", "--measure",
            "--output", str(out)] + [str(o) for o in tiny_opts({**TWO_BLOCKS, "MODEL.WEIGHTS": str(tmp_path / "tiny.pth")})]
    written = tool.main(argv)
    assert [Path(p).name for p in written] == ["00000_tokens_1.png", "00001_tokens.png"]
    assert (out / "00000_tokens.png").read_bytes() == b"not mine"
    assert cv2.imread(written[0]) is not None
    table = json.loads((out / "token_concentration.json").read_text())
    printed = capsys.readouterr().out
    assert table["stages"] == ["S", "S1", "S2", "Y"]
    for measure in ("positive mass", "centred", "separation"):
        assert table[measure][0]["class"] == "background" and table[measure][0]["images"] == 3
        assert table[measure][-1]["class"] == "mean"
        assert f"{measure}:\n| class" in printed
    assert 0 <= table["separation"][0]["Y"] <= 1
    readout = json.loads((out / "stage_readout.json").read_text())
    assert readout["stages"] == ["F", "S", "S1", "S2", "Y"] and readout["readout"][-1]["class"] == "mean"
    assert readout["readout"][-1]["images"] == 1 and "readout: the IoU" in printed  # 3 images: 2 fit, 1 scored
    argv[argv.index("--num") + 1] = "1"
    tool.main(argv)  # again: new names for everything
    assert (out / "token_concentration_1.csv").is_file() and (out / "00000_tokens_2.png").is_file()
    assert (out / "stage_readout_1.json").is_file()


def test_visualize_tokens_rejects_unknown_class_and_measure_without_labels(tiny_shapes, tmp_path):
    tool = load_tool("visualize_tokens")
    base = ["--config-file", str(SHAPES_CONFIG), "--output", str(tmp_path), "MODEL.WEIGHTS", "x.pth"]
    with pytest.raises(SystemExit, match="--classes hexagon: not a class of this model; valid: background"):
        tool.main(["--dataset", "shapes_sem_seg_val", "--classes", "hexagon"] + base)
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match="--measure needs ground truth"):
        tool.main(["--input", str(image), "--measure"] + base)


# -------------------------------------------------------------------------------- legends
PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]
NAMES = ["zero", "one", "two", "three", "four", "five"]


def _palette_colours_in(region):
    colours = {tuple(int(c) for c in px) for px in region.reshape(-1, 3)}
    return {k for k, colour in enumerate(PALETTE) if colour in colours}


def test_prediction_panel_legend_lists_exactly_the_classes_shown():
    pred = np.array([[1, 1, 3], [3, 3, 1]])
    gt = np.array([[3, 255, 4], [4, 4, 3]])
    image = np.full((2, 3, 3), 128, np.uint8)
    assert shown_classes(pred, gt) == [1, 3, 4]
    assert shown_classes(pred) == [1, 3]
    panel = prediction_panel(image, pred, PALETTE, gt, NAMES)
    assert panel.shape[1] == 9 and panel.shape[0] > 2
    # Below the 2-pixel-high panels, the legend's swatches: the colours of classes 1, 3, 4 only.
    assert _palette_colours_in(panel[2:]) == {1, 3, 4}
    np.testing.assert_array_equal(panel[:2], prediction_panel(image, pred, PALETTE, gt))
    # Many classes on a narrow panel wrap onto several lines, none dropped.
    wide = np.array([[0, 1, 2, 3, 4, 5]])
    wrapped = prediction_panel(np.zeros((1, 6, 3), np.uint8), wide, PALETTE, class_names=NAMES)
    assert _palette_colours_in(wrapped[1:]) == set(range(6))


def test_token_figure_legend_lists_the_classes_shown():
    pred = np.array([[1, 1], [2, 2]])
    gt = np.array([[1, 255], [5, 5]])
    maps = np.zeros((3, 6, 2, 2))
    fig = token_map_figure(np.zeros((2, 2, 3), np.uint8), pred, maps, ["S", "S1", "Y"], [1, 5], NAMES, PALETTE, gt)
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert [[t.get_text() for t in legend.get_texts()] for legend in legends] == [["one", "two", "five"]]
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()] == ["one", "five"]


# --------------------------------------------------------------------------------- curves
def _write_metrics(folder, records):
    (folder / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_load_metrics_keeps_the_latest_run_from_each_iteration(tmp_path):
    _write_metrics(tmp_path, [
        {"iteration": 19, "total_loss": 3.0, "lr": 0.1},
        {"iteration": 39, "total_loss": 2.0, "lr": 0.2},
        {"iteration": 59, "total_loss": 1.5, "lr": 0.3},
        {"iteration": 39, "total_loss": 2.5, "lr": 0.2},  # resumed from iteration 39
        {"iteration": 59, "total_loss": 1.0, "lr": 0.3, "sem_seg/mIoU": 40.0},
    ])
    (tmp_path / "metrics.json").open("a").write('{"iteration": 79, "total_lo')  # killed mid-line
    records = load_metrics(str(tmp_path))
    assert [(r["iteration"], r["total_loss"]) for r in records] == [(19, 3.0), (39, 2.5), (59, 1.0)]


def test_plot_metrics_draws_loss_lr_and_every_miou(tmp_path):
    records = [{"iteration": i, "total_loss": 1.0 / (i + 1), "lr": 0.001} for i in range(19, 100, 20)]
    records[-1].update({"sem_seg/mIoU": 50.0, "shapes_sem_seg_val_TTA/sem_seg/mIoU": 52.0})
    fig = metrics_figure(records)
    loss_ax, lr_ax, miou_ax = fig.axes[:3]
    assert list(loss_ax.lines[0].get_xdata()) == [19, 39, 59, 79, 99]
    assert [line.get_ydata()[0] for line in miou_ax.lines] == [50.0, 52.0]
    assert [t.get_text() for t in miou_ax.get_legend().get_texts()] == ["single-scale", "multi-scale + flip"]
    _write_metrics(tmp_path, records)
    path = plot_metrics(str(tmp_path))
    assert path == str(tmp_path / "curves.png") and cv2.imread(path).shape[2] == 3


def test_plot_metrics_tool_fails_clearly_without_metrics_json(tmp_path):
    tool = load_tool("plot_metrics")
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(tmp_path)])
    message = str(exit_info.value.code)
    assert str(tmp_path) in message and "no metrics.json" in message and "\n" not in message
    assert not list(tmp_path.iterdir())

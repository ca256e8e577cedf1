"""Model size and cost that the paper reports, by config file (for tools/analyze_model.py,
docs/model_zoo.md and the parameter-count tests).

Params in millions, GFLOPs as printed (one window at the test crop, counted with mmcv's
``get_flops``). Table V's printed backbone column is shifted by one group of rows; the values
below are its real rows (ViT-T: CSE / SSE / PWE = 7.16 / 13 / 10 GFLOPs, 8.9 / 14 / 12 M, the
CSE row matching Table III). Table IV (COCO-Stuff-10K) reports neither.
"""

#: config path (relative to configs/) -> (table, params [M], GFLOPs)
PAPER_COMPLEXITY = {
    "ade20k/structtoken_cse_vit_t_512.yaml": ("V", 8.9, 7.16),
    "ade20k/structtoken_sse_vit_t_512.yaml": ("V", 14, 13),
    "ade20k/structtoken_pwe_vit_t_512.yaml": ("V", 12, 10),
    "ade20k/structtoken_cse_vit_s_512.yaml": ("V", 30, 23),
    "ade20k/structtoken_sse_vit_s_512.yaml": ("V", 41, 37),
    "ade20k/structtoken_pwe_vit_s_512.yaml": ("V", 38, 31),
    "ade20k/structtoken_cse_vit_b_512.yaml": ("V", 113, 86),
    "ade20k/structtoken_sse_vit_b_512.yaml": ("V", 142, 123),
    "ade20k/structtoken_pwe_vit_b_512.yaml": ("V", 132, 105),
    "ade20k/structtoken_cse_vit_l_640.yaml": ("I", 350, 398),
    "ade20k/structtoken_sse_vit_l_640.yaml": ("I", 395, 486),
    "ade20k/structtoken_pwe_vit_l_640.yaml": ("I", 379, 442),
    "cityscapes/structtoken_cse_vit_l_768.yaml": ("II", 349, 567),
    "cityscapes/structtoken_sse_vit_l_768.yaml": ("II", 377, 651),
    "cityscapes/structtoken_pwe_vit_l_768.yaml": ("II", 364, 600),
}

"""Config keys of structtoken-d2, each documented once, here, where it is defined.

``add_structtoken_config(cfg)`` extends a Detectron2 ``get_cfg()`` with every key the project
reads. Keys that Detectron2 already defines (``MODEL.PIXEL_MEAN``, ``SOLVER.BASE_LR``,
``TEST.AUG.ENABLED`` ...) keep their Detectron2 meaning and are only given new defaults in the
YAML files under ``configs/``. Defaults below are the authors' choices (RockeyCoss/StructToken,
mmsegmentation); where the paper says otherwise, the key's comment says so.
"""
from detectron2.config import CfgNode as CN


def add_structtoken_config(cfg: CN) -> CN:
    """Add the StructToken keys to ``cfg`` in place and return it."""
    _add_model_config(cfg)
    _add_data_config(cfg)
    _add_solver_config(cfg)
    _add_test_config(cfg)
    return cfg


# ---------------------------------------------------------------------------- model
def _add_model_config(cfg: CN) -> None:
    # torch.compile the backbone and the head, for training and inference (nn.Module.compile(), in
    # place: the state_dict keys, and so the checkpoints, are those of the eager model), and the
    # optimizer step with its gradient clipping (structtoken_d2/engine/compiled_optimizer_step.py).
    # On a CPU the compiled code traces the ops' PyTorch reference (ops.COMPILE_TRACES_REFERENCE).
    # The first iterations, and the first images of each new input size, are slow while they compile.
    # tools/benchmark_model.py --compile measures what it gains on a machine (docs/benchmarks.md).
    cfg.MODEL.COMPILE = False
    cfg.MODEL.STRUCTTOKEN = CN()
    # Extraction module of every decoder block: "CSE" (cross-slice), "SSE" (self-slice) or "PWE"
    # (point-wise); one entry of EXTRACTION_REGISTRY (structtoken_d2/modeling/heads/extraction.py).
    cfg.MODEL.STRUCTTOKEN.VARIANT = "CSE"
    # Number of decoder blocks L (paper Sec. IV-D2: 4 for every variant).
    cfg.MODEL.STRUCTTOKEN.NUM_BLOCKS = 4
    # Decoder width C: output channels of the 1x1 `dec_proj` applied to the backbone feature.
    # 0 means "equal to the backbone's channels", as in every config of the authors.
    cfg.MODEL.STRUCTTOKEN.CHANNELS = 0
    # Spatial size [Hs, Ws] of the learnable structure tokens [K, Hs, Ws]: crop / 16 in the
    # authors' configs. Tokens are resized (TOKEN_INTERPOLATION) when the feature differs.
    cfg.MODEL.STRUCTTOKEN.TOKEN_SIZE = [32, 32]
    # Interpolation mode used to resize the structure tokens to the feature size.
    cfg.MODEL.STRUCTTOKEN.TOKEN_INTERPOLATION = "bicubic"
    # Std of the truncated-normal initialisation of the structure tokens.
    cfg.MODEL.STRUCTTOKEN.TOKEN_INIT_STD = 0.02
    # Expansion ratio of the FFNs (1x1 expand -> 3x3 group conv -> 1x1 shrink).
    cfg.MODEL.STRUCTTOKEN.FFN_RATIO = 4
    # Largest stochastic-depth rate in the decoder, linearly spaced over the blocks.
    cfg.MODEL.STRUCTTOKEN.DROP_PATH_RATE = 0.1
    # Scale of the channel-wise attention logits: "spatial" multiplies by (H*W)^-0.5, as the
    # authors' code does; "channel" divides by sqrt(C), as Eq. 2 and 6 of the paper write.
    cfg.MODEL.STRUCTTOKEN.ATTN_SCALE = "spatial"
    # Epsilon of the decoder's LayerNorms: projections (Phi/Psi/Upsilon) and the final ResBlock.
    cfg.MODEL.STRUCTTOKEN.LN_EPS = 1e-6
    # Epsilon of the FFNs' LayerNorms. The authors build them from the head's norm_cfg
    # dict(type='LN'), which mmcv completes with eps 1e-5 (not the projections' 1e-6).
    cfg.MODEL.STRUCTTOKEN.FFN_LN_EPS = 1e-5
    # Loss reduction. False: cross-entropy averaged over all pixels, ignored ones counting 0
    # (mmseg's default avg_non_ignore=False, as the authors trained); True: over non-ignored pixels.
    cfg.MODEL.STRUCTTOKEN.LOSS_AVG_NON_IGNORE = False
    # True: always use the pure-PyTorch reference of structtoken_d2.ops, even where the compiled
    # kernels are built (same effect as the environment variable STRUCTTOKEN_D2_FORCE_PYTORCH_OPS=1).
    cfg.MODEL.STRUCTTOKEN.FORCE_PYTORCH_OPS = False
    # Fine-tuning to another class count: True loads a checkpoint (MODEL.WEIGHTS) whose number of
    # classes differs from MODEL.SEM_SEG_HEAD.NUM_CLASSES, leaving every head tensor whose shape
    # depends on it (structure tokens, final ResBlock, K-wide projections/FFNs/norms) at its fresh
    # initialisation, with a WARNING listing them; everything else is loaded. False: such a
    # checkpoint is refused with ClassCountMismatchError.
    cfg.MODEL.STRUCTTOKEN.REINIT_CLASS_DEPENDENT_WEIGHTS = False

    cfg.MODEL.VIT = CN()
    # timm architecture name of the plain ViT backbone (MODEL.BACKBONE.NAME "TimmViT"), patch 16:
    # vit_tiny_patch16_384, vit_small_patch16_384, vit_base_patch16_384, vit_large_patch16_384, ...
    # Only the architecture comes from timm; its pretrained weights are never fetched.
    cfg.MODEL.VIT.NAME = "vit_base_patch16_384"
    # Override the architecture's width / depth / heads when non-zero (small models for tests).
    cfg.MODEL.VIT.EMBED_DIM = 0
    cfg.MODEL.VIT.DEPTH = 0
    cfg.MODEL.VIT.NUM_HEADS = 0
    # Attention of the ViT blocks: True runs F.scaled_dot_product_attention (timm's fused_attn), False
    # the explicit softmax(q k^T / sqrt(d)) v (the same result to rounding). On a CPU under bfloat16
    # autocast the fused kernel's backward is several times slower than the explicit one's matrix
    # products (docs/benchmarks.md), so the main job sets False.
    cfg.MODEL.VIT.FUSED_ATTENTION = True
    # Input size the backbone is built for: its position embeddings cover IMG_SIZE / 16 and are
    # resized (bicubic) to any other input at run time. The training crop, as in the authors'
    # configs; it sets the parameter count (pos_embed).
    cfg.MODEL.VIT.IMG_SIZE = [512, 512]
    # Local path of ImageNet weights for the backbone alone (timm .pth / .safetensors, the same in
    # mmseg's VisionTransformer names as mmseg's vit2mmseg writes the vit_*_p16_384.pth of the
    # authors' configs (detected from the keys), or an augreg .npz); position embeddings of
    # another grid are resized. Empty: random initialisation (logged); nothing is ever
    # downloaded. A missing file is an error.
    cfg.MODEL.VIT.WEIGHTS = ""
    # Stochastic-depth rate of the backbone.
    cfg.MODEL.VIT.DROP_PATH_RATE = 0.1
    # Apply the ViT's final LayerNorm to the output feature (the authors' mmseg ViT does not).
    cfg.MODEL.VIT.FINAL_NORM = False


# ---------------------------------------------------------------------------- data
def _add_data_config(cfg: CN) -> None:
    # Name of the dataset mapper used for training (DATASET_MAPPER_REGISTRY).
    cfg.INPUT.DATASET_MAPPER_NAME = "structtoken_semantic"
    # mmseg-style "img_scale" (long side, short side) that random resizing is relative to.
    cfg.INPUT.RESIZE_SCALE = [2048, 512]
    # Range of the random resize ratio applied to RESIZE_SCALE.
    cfg.INPUT.RESIZE_RATIO_RANGE = [0.5, 2.0]
    # Random crop keeps retrying (up to 10 times) while one category covers more than this
    # fraction of the crop (mmseg `cat_max_ratio`).
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 0.75
    # mmseg PhotoMetricDistortion (brightness, contrast, saturation, hue) on training images.
    cfg.INPUT.PHOTOMETRIC_DISTORTION = True
    # Keep every training image and label map decoded in memory after its first read (each data-loader
    # process its own copy; the augmentations get copies): for a dataset that fits in memory it saves
    # the decoding at every epoch. The synthetic shapes (2,000 images of 128 x 128, about 130 MB) turn
    # it on; ADE20K's 20,210 training images decoded would take tens of GB per process.
    cfg.DATALOADER.CACHE_DECODED_IMAGES = False

    # Your own data from the command line: a folder ROOT with images/<split>/*.<IMAGE_EXT> and
    # labels/<split>/*.png (8-bit train ids 0..K-1, 255 = ignore; matched by relative path without
    # extension) registers one dataset "folder_<split>" per split (use them in DATASETS.TRAIN/TEST).
    # "" registers nothing. In Python: structtoken_d2.data.datasets.register_folder_dataset.
    cfg.DATASETS.FOLDER = CN()
    cfg.DATASETS.FOLDER.ROOT = ""
    # Class names of the folder datasets, index = train id; their number must equal
    # MODEL.SEM_SEG_HEAD.NUM_CLASSES.
    cfg.DATASETS.FOLDER.CLASSES = []
    # Extension of the images ("jpg", "png", ...); "" accepts jpg, jpeg, png, bmp, tif, tiff, webp.
    cfg.DATASETS.FOLDER.IMAGE_EXT = ""


# ---------------------------------------------------------------------------- solver
def _add_solver_config(cfg: CN) -> None:
    # Optimizer: "ADAMW" (the paper's) or "SGD".
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # AdamW betas.
    cfg.SOLVER.BETAS = [0.9, 0.999]
    # How each parameter gets its learning rate and weight decay (structtoken_d2/engine/optimizer.py):
    # "norm_layers": weight decay 0 for parameters of norm layers and for names containing one of
    #   NO_WEIGHT_DECAY_KEYS; lr x HEAD_LR_MULTIPLIER for the decode head (sem_seg_head.*).
    # "mmcv_custom_keys": mmcv's paramwise_cfg.custom_keys, as the authors' configs use it. Each
    #   parameter's name IN THE AUTHORS' MODEL (mmseg names: decode_head.*, backbone.layers.N.ln1 ...;
    #   structtoken_d2/modeling/mmseg_names.py) is tested against the keys of CUSTOM_KEYS, longest
    #   key first (alphabetical among equal lengths); the first key it contains sets
    #   lr = BASE_LR * LR_MULT and weight decay = WEIGHT_DECAY * DECAY_MULT; no key: BASE_LR and
    #   WEIGHT_DECAY. With the authors' keys, the whole decode head (its norms and tokens too)
    #   gets lr x8 WITH weight decay, and the ViT's LayerNorms (ln1 / ln2) keep weight decay.
    cfg.SOLVER.PARAM_GROUPS = "norm_layers"
    # The custom_keys of PARAM_GROUPS "mmcv_custom_keys": {key: {LR_MULT: .., DECAY_MULT: ..}},
    # each multiplier 1.0 when not given, e.g. (the authors') decode_head: {LR_MULT: 8.0},
    # norm: {DECAY_MULT: 0.0}. Set in configs/Base-StructToken.yaml.
    cfg.SOLVER.CUSTOM_KEYS = CN(new_allowed=True)
    # PARAM_GROUPS "norm_layers": learning-rate multiplier of the decode head (sem_seg_head).
    cfg.SOLVER.HEAD_LR_MULTIPLIER = 8.0
    # Power of the poly learning-rate decay (1.0 = linear decay to 0).
    cfg.SOLVER.POLY_LR_POWER = 1.0
    # Mixed-precision dtype when SOLVER.AMP.ENABLED: "bfloat16" (where supported) or "float16".
    cfg.SOLVER.AMP.DTYPE = "bfloat16"
    # What the training step's autocast (SOLVER.AMP.ENABLED) covers: "model" (backbone and head) or
    # "backbone" (the ViT's matrix products; the head, its structure tokens and slice interactions, in
    # float32). The main job's structure tokens stopped marking out the shapes block by block with the
    # head in bfloat16 (docs/structure_tokens.md); its speed is in the backbone's matrix products.
    cfg.SOLVER.AMP.SCOPE = "model"
    # PARAM_GROUPS "norm_layers": parameters whose full name contains one of these get no weight
    # decay (norm layers never do): position embedding, class token and the structure tokens.
    cfg.SOLVER.NO_WEIGHT_DECAY_KEYS = ["pos_embed", "cls_token", "sem_seg_head.tokens"]


# ---------------------------------------------------------------------------- test
def _add_test_config(cfg: CN) -> None:
    # Inference mode (StructTokenSegmentor): "slide" (mmseg's sliding window: per side
    # max(H - crop + stride - 1, 0) // stride + 1 windows, clipped to the image, overlapping
    # logits averaged) or "whole" (one pass over the whole image).
    cfg.TEST.MODE = "slide"
    # Sliding-window crop [h, w] and stride [h, w] (authors: 512/341 at 512 crop, 640/426 at 640,
    # 768/512 on Cityscapes).
    cfg.TEST.SLIDE_CROP_SIZE = [512, 512]
    cfg.TEST.SLIDE_STRIDE = [341, 341]
    # How the head's stride-16 logits of one pass (a window, or the whole image) of size H x W
    # are brought to H x W (bilinear, align_corners False either way). The ViT zero-pads the input
    # to ceil(H/16)*16 x ceil(W/16)*16, so logit (i, j) belongs to the patch at rows 16i..16i+15.
    # "aligned": upsample to the padded size, then crop the padding off; each logit stays centred
    # on its patch: the geometrically exact rule. "mmseg": resize straight to H x W, as mmseg's
    # EncoderDecoder.encode_decode does (how the authors' numbers were evaluated); when H or W is
    # not a multiple of 16 this stretches the padded grid over the unpadded image, shifting
    # predictions towards the top-left by up to 15 px at the bottom/right edge. Both give the same
    # result when H and W are multiples of 16 (e.g. full 512x512 sliding windows).
    cfg.TEST.LOGITS_RESIZE = "aligned"
    # Most passes through the network per forward (TEST.MODE slide: windows; whole: images). The
    # windows of an image and of its flipped view (and views of equal size) are stacked and run
    # this many at a time; 1 runs them one by one, as mmseg does. The result is the same to float
    # rounding. 4 suits a CPU (docs/benchmarks.md: 8 is slower there on 512x512 windows, whose
    # activations then overflow the caches); a GPU may want more. The network's activations grow
    # with it; the window logits are resized and summed one window at a time.
    cfg.TEST.SLIDE_BATCH = 4
    # Multi-scale test (with TEST.AUG.ENABLED): resize ratios applied to the test scale, each
    # prediction run through TEST.MODE, softmax probabilities averaged (mmseg MultiScaleFlipAug).
    cfg.TEST.AUG.RATIOS = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    # mmseg-style test "img_scale" (long side, short side) that the ratios apply to.
    cfg.TEST.SCALE = [2048, 512]
    # Number of predictions saved per evaluation as image | ground truth | prediction panels under
    # OUTPUT_DIR/inference[_TTA]/predictions/<dataset> (0: none).
    cfg.TEST.PREDICTION_IMAGES = 8
    # Evaluate DATASETS.TEST after the last iteration (Detectron2's EvalHook always does; with
    # TEST.AUG.ENABLED the trainer adds a test-time-augmentation evaluation). False skips both,
    # e.g. for smoke runs; periodic evaluations (TEST.EVAL_PERIOD) still run, the last one included.
    cfg.TEST.EVAL_AFTER_TRAIN = True
    # Evaluate only the first N images of each test dataset (0: all), e.g. for quick runs.
    cfg.TEST.EVAL_NUM_IMAGES = 0

"""torch.compile: the head with the custom ops captured as one graph (fullgraph=True), on CPU the
reference ops traced instead, MODEL.COMPILE
models whose checkpoints are those of eager models, in training (save, resume) and inference, and the
compiled optimizer step, equal to the eager one (learning rate 0 included)."""
import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import structtoken_d2  # noqa: F401  (registrations)
from detectron2.modeling import build_model
from structtoken_d2 import ops
from structtoken_d2.data.datasets import shapes
from structtoken_d2.engine import Trainer
from structtoken_d2.engine.compiled_optimizer_step import compile_optimizer_step
from structtoken_d2.engine.gradient_clipping import build_gradient_clipper, with_gradient_clipping
from structtoken_d2.engine.optimizer import build_optimizer
from structtoken_d2.modeling import StructTokenHead
from tiny_runs import Interrupt, tiny_cfg

needs_kernels = pytest.mark.skipif("cpu" not in ops.COMPILED_DEVICE_TYPES, reason="structtoken_d2._C is not built")


def small_head(variant):
    torch.manual_seed(0)
    return StructTokenHead(in_feature="f", in_channels=16, num_classes=5, variant=variant, num_blocks=2,
                           token_size=(4, 4), drop_path_rate=0.0)


def compiled_head_graphs(variant):
    """The ATen ops of the forward and backward graphs of the compiled ``small_head(variant)`` (float64,
    fullgraph=True: an error at any graph break; through AOT autograd: the ops' fake kernels and
    autograd formulas), after checking its logits and gradients against the eager head's."""
    head = small_head(variant).double()
    feature = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 5, 7))
    graphs = {"forward": set(), "backward": set()}

    def recorder(kind):
        def compiler(graph_module, example_inputs):
            graphs[kind].update(n.target for n in graph_module.graph.nodes if n.op == "call_function")
            return make_boxed_func(graph_module.forward)
        return compiler

    def loss_and_grads(module):
        head.zero_grad(set_to_none=True)
        logits = module({"f": feature})
        F.cross_entropy(logits, labels).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in head.named_parameters()}

    eager_logits, eager_grads = loss_and_grads(head)
    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    compiled_logits, compiled_grads = loss_and_grads(torch.compile(head, backend=backend, fullgraph=True))
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-9, atol=1e-12)
    assert compiled_grads.keys() == eager_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-9, atol=1e-12, msg=name)
    return graphs


@needs_kernels
@pytest.mark.parametrize("variant", ["CSE", "PWE"])
def test_head_with_the_custom_ops_compiles_as_one_graph(variant, monkeypatch):
    """With the kernels traced (as on CUDA), they are in the graphs, not a fallback."""
    monkeypatch.setattr(ops, "COMPILE_TRACES_REFERENCE", frozenset())
    monkeypatch.setattr(ops, "REFERENCE_IS_FASTER", {})
    assert ops.active_implementation("cpu") == "compiled-cpu"
    graphs = compiled_head_graphs(variant)
    library = torch.ops.structtoken
    assert library.depthwise_projection.default in graphs["forward"]
    assert library.depthwise_projection_backward.default in graphs["backward"]
    assert (library.slice_attention.default in graphs["forward"]) == (variant == "CSE")
    assert (library.slice_attention_backward.default in graphs["backward"]) == (variant == "CSE")


@needs_kernels
@pytest.mark.parametrize("variant", ["CSE", "PWE"])
def test_compiled_cpu_code_traces_the_reference_ops(variant):
    """On CPU (ops.COMPILE_TRACES_REFERENCE), torch.compile sees the reference's ATen ops, which it can
    fuse, where eager code calls the kernels."""
    assert "cpu" in ops.COMPILE_TRACES_REFERENCE and ops.active_implementation("cpu") == "compiled-cpu"
    graphs = compiled_head_graphs(variant)
    in_graphs = {str(target) for target in graphs["forward"] | graphs["backward"]}
    assert not [t for t in in_graphs if t.startswith("structtoken.")]
    assert {"aten.native_layer_norm.default", "aten.gelu.default", "aten.convolution.default"} <= in_graphs
    if variant == "CSE":
        assert "aten._softmax.default" in in_graphs


@pytest.fixture
def aot_eager_compile(monkeypatch):
    """MODEL.COMPILE's ``nn.Module.compile()`` through the ``aot_eager`` backend: the same graph capture
    and autograd as inductor, without its minutes of C++ compilation on a small CPU."""
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, **{"backend": "aot_eager", **kw}))
    compile_function = torch.compile  # and the optimizer step's
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_function(fn, **{"backend": "aot_eager", **kw}))


def test_model_compile_keeps_the_eager_checkpoint_format(aot_eager_compile):
    torch.manual_seed(0)
    eager = build_model(tiny_cfg()).eval()
    compiled = build_model(tiny_cfg({"MODEL.COMPILE": True})).eval()
    assert eager.backbone._compiled_call_impl is None and eager.sem_seg_head._compiled_call_impl is None
    assert compiled.backbone._compiled_call_impl is not None and compiled.sem_seg_head._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())  # strict
    inputs = [{"image": torch.randint(0, 256, (3, 45, 70), dtype=torch.uint8)}]
    with torch.no_grad():
        torch.testing.assert_close(compiled(inputs)[0]["sem_seg"], eager(inputs)[0]["sem_seg"])


def test_compiled_training_checkpoints_and_resumes_like_eager(aot_eager_compile, tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setattr(shapes, "SHAPES_SPLITS", {"train": (6, 0), "val": (2, 1)})
    out = tmp_path / "run"
    cfg = tiny_cfg({"MODEL.COMPILE": True, "SOLVER.MAX_ITER": 3, "SOLVER.CHECKPOINT_PERIOD": 2,
                    "OUTPUT_DIR": str(out), "TEST.EVAL_AFTER_TRAIN": False})
    trainer = Trainer(cfg)
    assert trainer.model.sem_seg_head._compiled_call_impl is not None
    trainer.resume_or_load(resume=False)
    trainer.register_hooks([Interrupt(after_iter=1)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    checkpoint = torch.load(out / "model_0000001.pth", map_location="cpu", weights_only=False)
    eager = build_model(tiny_cfg())
    assert list(checkpoint["model"]) == list(eager.state_dict())  # no "_orig_mod." anywhere
    eager.load_state_dict(checkpoint["model"])  # strict: an eager model takes the compiled run's weights

    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    resumed.train()
    steps = {int(s["step"]) for s in resumed.optimizer.state_dict()["state"].values()}
    assert steps == {3}  # AdamW's state came back from the checkpoint, then one more step
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 2
    assert not torch.equal(final["model"]["sem_seg_head.tokens"], checkpoint["model"]["sem_seg_head.tokens"])


@pytest.mark.parametrize("clip_type", ["norm", "value"])
def test_the_compiled_optimizer_step_is_the_eager_one_learning_rate_0_included(clip_type):
    """Clipping (large gradients, so it acts) + AdamW over steps whose learning rates change (one
    recompilation) and include 0, with a gradient element that is always 0: dynamo traces AdamW's
    capturable update, which divides by the step size and gives NaN there at lr 0; the eager step
    leaves the parameter as it is."""
    clip_cfg = tiny_cfg({"SOLVER.CLIP_GRADIENTS.CLIP_TYPE": clip_type}).SOLVER.CLIP_GRADIENTS
    optimizer_class = with_gradient_clipping(torch.optim.AdamW, build_gradient_clipper(clip_cfg))

    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((4, 3), (5,), (2, 2, 3))]
        groups = [{"params": params[:2], "weight_decay": 0.0}, {"params": params[2:], "weight_decay": 0.01}]
        return params, optimizer_class(groups, lr=1e-3)

    eager_params, eager = make()
    compiled_params, compiled = make()
    compile_optimizer_step(compiled, backend="eager")
    for step, lr in enumerate([1e-3, 9e-4, 0.0, 0.0, 8e-4]):
        for params, optimizer in ((eager_params, eager), (compiled_params, compiled)):
            for group in optimizer.param_groups:
                group["lr"] = lr
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i)) * 5
                p.grad[(0,) * p.dim()] = 0.0  # never a gradient: AdamW's second moment stays 0 there
        eager.step()
        compiled.step()
        for e, c in zip(eager_params, compiled_params):
            assert torch.isfinite(c).all(), f"step {step} (lr {lr}): non-finite parameters"
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, msg=f"step {step} (lr {lr})")
    assert not torch.equal(eager_params[0], make()[0][0])  # the steps moved the parameters


def test_model_compile_compiles_the_optimizer_step():
    model = build_model(tiny_cfg())
    assert build_optimizer(tiny_cfg(), model).step.__func__.__name__ == "step"  # the class's own
    compiled = build_optimizer(tiny_cfg({"MODEL.COMPILE": True}), model)
    assert compiled.step.__func__.__qualname__.startswith("compile_optimizer_step.")
    with pytest.raises(ValueError, match="takes no closure"):
        compiled.step(lambda: 0.0)

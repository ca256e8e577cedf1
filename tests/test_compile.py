"""torch.compile: the head with the custom ops captured as one graph (fullgraph=True), and MODEL.COMPILE
models whose checkpoints are those of eager models, in training (save, resume) and inference."""
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
from structtoken_d2.modeling import StructTokenHead
from tiny_runs import Interrupt, tiny_cfg

needs_kernels = pytest.mark.skipif("cpu" not in ops.COMPILED_DEVICE_TYPES, reason="structtoken_d2._C is not built")


def small_head(variant):
    torch.manual_seed(0)
    return StructTokenHead(in_feature="f", in_channels=16, num_classes=5, variant=variant, num_blocks=2,
                           token_size=(4, 4), drop_path_rate=0.0)


@needs_kernels
@pytest.mark.parametrize("variant", ["CSE", "PWE"])
def test_head_with_the_custom_ops_compiles_as_one_graph(variant):
    """fullgraph=True (an error at any graph break), through AOT autograd (the ops' fake kernels and
    autograd formulas); in float64 (the CPU kernels have it), so that only a real difference shows."""
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

    assert ops.active_implementation("cpu") == "compiled-cpu"
    eager_logits, eager_grads = loss_and_grads(head)
    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    compiled_logits, compiled_grads = loss_and_grads(torch.compile(head, backend=backend, fullgraph=True))

    library = torch.ops.structtoken  # the compiled kernels are in the graphs, not a fallback
    assert library.depthwise_projection.default in graphs["forward"]
    assert library.depthwise_projection_backward.default in graphs["backward"]
    assert (library.slice_attention.default in graphs["forward"]) == (variant == "CSE")
    assert (library.slice_attention_backward.default in graphs["backward"]) == (variant == "CSE")
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-9, atol=1e-12)
    assert compiled_grads.keys() == eager_grads.keys()
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.fixture
def aot_eager_compile(monkeypatch):
    """MODEL.COMPILE's ``nn.Module.compile()`` through the ``aot_eager`` backend: the same graph capture
    and autograd as inductor, without its minutes of C++ compilation on a small CPU."""
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, **{"backend": "aot_eager", **kw}))


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

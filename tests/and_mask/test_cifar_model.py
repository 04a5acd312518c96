"""FastResnet and its per-example gradients through the shared BatchNorm statistics."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from and_mask.core.per_env_grads import per_env_grads, resolve_engine
from and_mask.models import FastResnet


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FastResnet()


def test_architecture(model):
    convs = [(m.in_channels, m.out_channels, m.kernel_size, m.padding, m.bias is None)
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    widths = [(3, 64), (64, 128), (128, 128), (128, 128), (128, 256), (256, 512), (512, 512), (512, 512)]
    assert convs == [(a, b, (3, 3), (1, 1), True) for a, b in widths]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 8
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    assert model.classifier.weight.shape == (10, 512) and model.classifier.bias is None


def test_output_shape_and_logit_scaling(model):
    model.eval()
    x = torch.randn(5, 3, 32, 32)
    seen = {}
    handle = model.classifier.register_forward_hook(lambda module, inputs, output: seen.update(raw=output))
    logits = model(x)
    handle.remove()
    assert logits.shape == (5, 10)
    assert torch.allclose(logits, 0.125 * seen["raw"])
    # The head is a global max-pool of the last 4×4 feature map.
    features = model.layer3(model.layer2(model.layer1(model.prep(x))))
    assert features.shape == (5, 512, 4, 4)
    assert torch.allclose(logits, 0.125 * model.classifier(features.amax(dim=(2, 3))))


def test_uint8_input_is_divided_by_255(model):
    model.eval()
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(model(x), model(x.float() / 255), atol=1e-6)


def test_shared_engine_equals_the_loop_through_batchnorm():
    """Per-example environments in training mode: the batch statistics couple the examples."""
    torch.manual_seed(1)
    model = FastResnet().train()
    # 16×16 inputs (the global max-pool accepts any size) keep the loop fast.
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    assert resolve_engine(model, "auto") == "shared"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for engine, chunk in (("loop", None), ("shared", None), ("shared", 3)):
        model.load_state_dict(state)
        results[engine, chunk] = per_env_grads(model, x, y, F.cross_entropy, 4, engine=engine, chunk_size=chunk)
    reference = results["loop", None]
    for key in (("shared", None), ("shared", 3)):
        assert torch.allclose(results[key].env_losses, reference.env_losses)
        for g, g_ref in zip(results[key].grads, reference.grads):
            assert g.shape == (4, *g_ref.shape[1:])
            assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-5 * float(g_ref.abs().max()))
    # Each example's gradient depends on the others through the statistics: a per-example
    # forward pass (the vmap engine) normalises every example alone and gives other gradients.
    model.load_state_dict(state)
    alone = per_env_grads(model, x, y, F.cross_entropy, 4, engine="vmap")
    scale = float(reference.grads[0].abs().max())
    assert not torch.allclose(alone.grads[0], reference.grads[0], rtol=1e-2, atol=1e-2 * scale)

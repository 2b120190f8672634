"""Multi-scale and flip testing: one view is the plain path, a mirrored image gives the
mirrored prediction, views average."""

import pytest
import torch

from discli.errors import UsageError
from discli.infer.loop import InferenceConfig
from discli.infer.runtime import Views, check_scales, infer_views
from discli.infer.runtime import run_inference, upsample_probs

CFG = InferenceConfig(lr=0.003)


def test_scale_one_alone_is_the_plain_path(tiny_model):
    images = torch.randn(2, 3, 40, 48)
    got = infer_views(tiny_model, images, [0, 5], CFG)
    plain = run_inference(tiny_model, images, [0, 5], CFG)
    for t in (0, 5):
        assert torch.equal(got[t].probs, upsample_probs(plain[t].probs, (40, 48)))
        assert torch.equal(got[t].tag_probs, plain[t].tag_probs.float())


@pytest.mark.parametrize("scales", [(1.0,), (0.75, 1.25)])
def test_flipped_image_gives_the_mirrored_prediction(tiny_model, scales):
    images = torch.randn(1, 3, 40, 48)
    a = infer_views(tiny_model, images, [0, 3], CFG, Views(scales, flip=True))
    b = infer_views(tiny_model, images.flip(-1), [0, 3], CFG, Views(scales, flip=True))
    for t in (0, 3):  # with --flip both views are seen either way: the result is symmetric
        assert torch.allclose(a[t].probs, b[t].probs.flip(-1), atol=1e-5)
        assert torch.allclose(a[t].tag_probs, b[t].tag_probs, atol=1e-5)
        assert a[t].probs.shape == (1, 6, 40, 48)
        assert torch.allclose(a[t].probs.sum(1), torch.ones(1, 40, 48), atol=1e-4)


def test_views_average_the_single_scale_results(tiny_model):
    images = torch.randn(2, 3, 32, 40)
    both = infer_views(tiny_model, images, [2], CFG, Views((0.5, 1.5)))
    small = infer_views(tiny_model, images, [2], CFG, Views((0.5,)))
    large = infer_views(tiny_model, images, [2], CFG, Views((1.5,)))
    assert torch.allclose(both[2].probs, (small[2].probs + large[2].probs) / 2, atol=1e-6)
    assert not torch.allclose(small[2].probs, large[2].probs)  # the scales really differ


def test_scales_are_checked():
    assert check_scales([0.5, 1]) == (0.5, 1.0)
    for bad in ([], [0.0], [-1.0], [float("nan")], [5.0]):
        with pytest.raises(ValueError, match="scale"):
            check_scales(bad)
        with pytest.raises(UsageError, match="scale"):  # as the commands report it (exit 2)
            Views(bad).checked()
    assert Views([1, 0.5], 1).checked() == Views((1.0, 0.5), True)
    assert Views((0.5, 1.0), True).pairs() == [(0.5, False), (0.5, True), (1.0, False),
                                               (1.0, True)]

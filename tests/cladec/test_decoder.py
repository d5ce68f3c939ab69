import pytest
import torch

from lightning_xai.cladec import build_decoder


@pytest.mark.parametrize(
    "code_shape, input_shape",
    [
        ((32, 2, 2), (1, 8, 8)),  # digits, last conv block
        ((16, 4, 4), (1, 8, 8)),
        ((64,), (1, 8, 8)),  # digits, last hidden layer
        ((64, 7, 7), (1, 28, 28)),  # MNIST conv map
        ((128,), (1, 28, 28)),
        ((512,), (3, 32, 32)),
        ((256, 4, 4), (3, 32, 32)),
        ((16, 24), (3, 32, 32)),  # 16 tokens of width 24 on a 4x4 grid
        ((10, 24), (3, 32, 32)),  # 10 tokens: not a grid, flattened
        ((32, 5, 5), (3, 30, 30)),  # not a power of two apart: resized
        ((64,), (30,)),  # tabular
        ((8, 4), (30,)),
    ],
)
def test_decoder_maps_codes_to_inputs(code_shape, input_shape):
    decoder = build_decoder(code_shape, input_shape, width=8)
    out = decoder(torch.randn(3, *code_shape))
    assert out.shape == (3, *input_shape)
    assert out.min() >= 0 and out.max() <= 1  # sigmoid output


def test_identity_output_and_bad_activation():
    decoder = build_decoder((4,), (5,), output_activation="identity")
    assert not any(isinstance(m, torch.nn.Sigmoid) for m in decoder.modules())
    with pytest.raises(ValueError, match="output_activation='tanh'"):
        build_decoder((4,), (5,), output_activation="tanh")

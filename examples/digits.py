"""A small CNN for the 8x8 handwritten digits that scikit-learn ships (1797 images, 10 classes)."""
import tdc
from tdc import nn


@tdc.model(batch=32)
def digits(x: tdc.f32["B", 1, 8, 8]):
    h = nn.conv2d(x, 16, 3, pad=1, name="conv1").relu()     # 16x8x8
    h = nn.conv2d(h, 32, 3, pad=1, name="conv2").relu()     # 32x8x8
    h = tdc.maxpool2d(h, 2)                                  # 32x4x4
    h = h.flatten()                                          # 512
    h = nn.linear(h, 64, name="fc1").relu()
    return nn.linear(h, 10, name="fc2", init="glorot_uniform")

"""LeNet-5 on 1x28x28 images (MNIST): two 5x5 convolutions with max pooling, then three dense layers."""
import tdc
from tdc import nn


@tdc.model(batch=64)
def lenet(x: tdc.f32["B", 1, 28, 28]):
    h = nn.conv2d(x, 6, 5, pad=2, name="conv1").relu()      # 6x28x28
    h = tdc.maxpool2d(h, 2)                                  # 6x14x14
    h = nn.conv2d(h, 16, 5, name="conv2").relu()             # 16x10x10
    h = tdc.maxpool2d(h, 2)                                  # 16x5x5
    h = h.flatten()                                          # 400
    h = nn.linear(h, 120, name="fc1").relu()
    h = nn.linear(h, 84, name="fc2").relu()
    return nn.linear(h, 10, name="fc3", init="glorot_uniform")

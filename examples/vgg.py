"""A VGG-style network for 3x32x32 images (CIFAR-10 sized): stacks of 3x3 convolutions with
padding 1, batch normalization and ReLU, each stage ending in 2x2 max pooling."""
import tdc
from tdc import nn


def block(h, channels, n, stage):
    for i in range(n):
        h = nn.conv2d(h, channels, 3, pad=1, bias=False, name=f"conv{stage}_{i + 1}")
        h = nn.batchnorm(h, name=f"bn{stage}_{i + 1}").relu()
    return tdc.maxpool2d(h, 2)


@tdc.model(batch=32)
def vgg(x: tdc.f32["B", 3, 32, 32]):
    h = block(x, 32, 2, 1)      # 32x16x16
    h = block(h, 64, 2, 2)      # 64x8x8
    h = block(h, 128, 2, 3)     # 128x4x4
    h = h.flatten()             # 2048
    h = nn.dropout(nn.linear(h, 256, name="fc1").relu(), 0.5, name="drop1")
    return nn.linear(h, 10, name="fc2", init="glorot_uniform")

"""The 784-300-100-10 multilayer perceptron with ReLU (LeCun et al. 1998; the pruning literature's LeNet-300-100)."""
import tdc
from tdc import nn


@tdc.model(batch=128)
def mlp(x: tdc.f32["B", 784]):
    h = nn.linear(x, 300, name="fc1").relu()
    h = nn.linear(h, 100, name="fc2").relu()
    return nn.linear(h, 10, name="fc3", init="glorot_uniform")

"""The built-in target models, registered by name (`fedleak.models.registry`).

Imported on the first lookup of a model name; plugins register the same way.
"""

from __future__ import annotations

from fedleak.models.convnet import ConvNet
from fedleak.models.lenet import LeNet
from fedleak.models.mlp import MLP
from fedleak.models.registry import register_model
from fedleak.models.resnet import resnet18, resnet20
from fedleak.models.transformer import CausalTransformer

register_model("lenet", lambda shape, k: LeNet(shape, k), image=True)
register_model("convnet", lambda shape, k: ConvNet(shape, k), image=True, min_size=4)
register_model(
    "convnet-bn",
    lambda shape, k: ConvNet(shape, k, batchnorm=True),
    image=True,
    min_size=4,
    groupnorm="convnet",
)
register_model(
    "resnet20", lambda shape, k: resnet20(shape, k, norm="bn"), image=True, groupnorm="resnet20-gn"
)
register_model("resnet20-gn", lambda shape, k: resnet20(shape, k, norm="gn"), image=True)
register_model(
    "resnet18", lambda shape, k: resnet18(shape, k, norm="bn"), image=True, groupnorm="resnet18-gn"
)
register_model("resnet18-gn", lambda shape, k: resnet18(shape, k, norm="gn"), image=True)
register_model("mlp", lambda shape, k: MLP(shape, k))
# The language task: input_shape (L,) of token ids, num_classes = vocabulary size.
register_model("transformer3", lambda shape, k: CausalTransformer(k), modality="tokens")

"""larq-zoo's models in Flax, written with :mod:`~bnn_jax.models.larq_zoo.functional` so that
their variables, names and layer order are larq-zoo's own (its ``.h5`` weight files convert)."""
from bnn_jax.models.larq_zoo.alexnet import BinaryAlexNet, DoReFaNet, XNORNet
from bnn_jax.models.larq_zoo.birealnet import BiRealNet
from bnn_jax.models.larq_zoo.densenet import (BinaryDenseNet28, BinaryDenseNet37,
                                              BinaryDenseNet37Dilated, BinaryDenseNet45)
from bnn_jax.models.larq_zoo.meliusnet import MeliusNet22
from bnn_jax.models.larq_zoo.quicknet import QuickNet
from bnn_jax.models.larq_zoo.real_to_bin_nets import RealToBinNet
from bnn_jax.models.larq_zoo.resnet_e import BinaryResNetE

# backbone name (model.backbone) -> module; each is a whole model (classifier included)
LARQ_ZOO_BACKBONES = {"QuickNet": QuickNet, "XNORNet": XNORNet, "DoReFaNet": DoReFaNet,
                      "BinaryAlexNet": BinaryAlexNet,
                      "BinaryDenseNet28": BinaryDenseNet28, "BinaryDenseNet37": BinaryDenseNet37,
                      "BinaryDenseNet37Dilated": BinaryDenseNet37Dilated,
                      "BinaryDenseNet45": BinaryDenseNet45, "MeliusNet22": MeliusNet22,
                      "BinaryResNetE": BinaryResNetE, "BiRealNet": BiRealNet,
                      "RealToBinNet": RealToBinNet}

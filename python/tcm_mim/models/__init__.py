"""SparK-style sparse encoders, the light decoder and the MIM model, built from tcm_kernels ops."""

from .encoders import SparseConvNeXt, SparseResNet, build_encoder
from .export import export_dense, export_resnet_state_dict
from .spark import SparKMIM, set_backend

__all__ = ["SparseConvNeXt", "SparseResNet", "SparKMIM", "build_encoder", "export_dense", "export_resnet_state_dict",
           "set_backend"]

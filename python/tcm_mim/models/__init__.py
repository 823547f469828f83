"""SparK-style sparse encoders, the light decoder and the MIM model, built from tcm_kernels ops."""

from .encoders import SparseConvNeXt, SparseResNet, build_encoder
from .export import export_dense, export_resnet_state_dict
from .spark import DECODERS, SparKMIM, param_groups, set_backend, sync_decoder_norms

__all__ = ["DECODERS", "SparseConvNeXt", "SparseResNet", "SparKMIM", "build_encoder", "export_dense",
           "export_resnet_state_dict", "param_groups", "set_backend", "sync_decoder_norms"]

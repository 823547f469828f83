from .sparse_conv import SparseDownsample2d, SparseDownsample3d, SubMConv2d, SubMConv3d

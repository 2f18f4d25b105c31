"""Packaging for the MV_Hybrid pathology foundation-model codebase."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

CORE = [
    "torch>=2.4,<2.15",
    "torchvision>=0.19",
    "numpy>=1.24",
    "timm>=1.0.9",
    "einops>=0.7",
    "omegaconf>=2.3",
    "fvcore>=0.1.5.post20221221",
    "submitit>=1.5",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
    "h5py>=3.9",
    "pandas>=2.0",
    "scipy>=1.11",
    "scikit-learn>=1.3",
    "matplotlib>=3.7",
    "pillow>=10.0",
]
EXTRAS = {
    # Optional CUDA kernels; everything falls back to pure PyTorch without them.
    "cuda": ["mamba-ssm>=2.2.2", "causal-conv1d>=1.4.0", "xformers>=0.0.27"],
    "eval": ["scikit-survival>=0.22", "lifelines>=0.27", "scanpy>=1.10", "anndata>=0.10"],
    "wsi": ["openslide-python>=1.3", "openslide-bin>=4.0", "opencv-python-headless>=4.8", "tifffile>=2023.7"],
}
EXTRAS["test"] = EXTRAS["eval"] + EXTRAS["wsi"] + ["pytest>=7.4", "pytest-timeout>=2.2"]
EXTRAS["all"] = EXTRAS["eval"] + EXTRAS["wsi"]

setup(
    name="mvhybrid",
    version="0.1.0",
    description="MV_Hybrid and SSM/ViT backbones for pathology foundation models, with a DINOv2 trainer and frozen-feature evaluations",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    # The top-level configs/ (the default schema and the paper recipes) ship inside the package as
    # dino/configs/files, where dino.configs finds them when there is no checkout.
    packages=find_packages(include=["mambavision*", "dino*", "eval*"])
    + ["dino.configs.files", "dino.configs.files.train", "dino.configs.files.demo"],
    package_dir={"dino.configs.files": "configs"},
    package_data={"dino.configs.files": ["*.yaml", "train/*.yaml", "demo/*.yaml"]},
    include_package_data=True,
    install_requires=CORE,
    extras_require=EXTRAS,
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
    ],
)

"""Install pcg_backend and register the "pcg" torch.compile backend through an entry point."""

from setuptools import find_packages, setup

setup(
    name="pcg_backend",
    version="0.1.0",
    description="Piecewise CUDA graphs for hybrid Mamba+attention models, as a torch.compile backend",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["pcg_backend", "pcg_backend.*"]),
    # The ranges that are tested: torch 2.11 (CUDA) and 2.13 (CPU), transformers 5.17 (CUDA) to the newest 5.x
    # (CPU). Install torch first, built for your machine (README, "Install"): pip would otherwise pick a build.
    python_requires=">=3.10",
    install_requires=["torch>=2.11,<2.14", "transformers>=5.17,<6", "tqdm"],
    extras_require={
        "cuda": ["triton", "mamba-ssm", "causal-conv1d"],
        "test": ["pytest"],
        "bench": ["matplotlib"],
    },
    entry_points={"torch_dynamo_backends": ["pcg = pcg_backend.backend:pcg_backend"]},
)

"""Install pcg_backend and register the "pcg" torch.compile backend through an entry point."""

from setuptools import find_packages, setup

setup(
    name="pcg_backend",
    version="0.1.0",
    description="Piecewise CUDA graphs for hybrid Mamba+attention models, as a torch.compile backend",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["pcg_backend", "pcg_backend.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "transformers>=5.0", "tqdm"],
    extras_require={
        "cuda": ["triton", "mamba-ssm", "causal-conv1d"],
        "test": ["pytest"],
        "bench": ["matplotlib"],
    },
    entry_points={"torch_dynamo_backends": ["pcg = pcg_backend.backend:pcg_backend"]},
)

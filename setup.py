"""megamm: multi-modal transformers trained at scale on DeepSpeed."""

from setuptools import find_packages, setup

setup(
    name="megamm",
    version="0.1.0",
    description="Tensor-, pipeline- and data-parallel multi-modal transformer training on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megamm", "megamm.*"]),
    package_data={"megamm": ["configs/*.yaml"]},
    install_requires=[
        # Install the torch build for your accelerator first; any torch >= 2.3 works.
        "torch>=2.3",
        "deepspeed>=0.19,<0.20",
        "webdataset>=1.0,<2",
        "braceexpand>=0.1.7",
        "sentencepiece>=0.2",
        "tensorboard>=2.16",
        "Pillow>=10",
        "soundfile>=0.12",
        "numpy>=1.24",
        "PyYAML>=6",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "sacrebleu>=2",
    ],
    extras_require={
        "dev": ["pytest>=8", "fairscale==0.4.13", "mpi4py>=4", "mpich"],
        "mpi": ["mpi4py>=4", "mpich"],
    },
)

"""The project's loose requirements: lower bounds for installing these packages into an environment of
your own. The versions that are tested are pinned in requirements.txt, the lock that `make lock` makes
from this file and `make install` installs."""
from setuptools import find_packages, setup

setup(
    name="learning-explanations-hard-to-vary",
    version="0.1.0",
    description="AND-mask and other rules for combining per-environment gradients (Parascandolo et al., ICLR 2021).",
    packages=find_packages(include=["and_mask", "and_mask.*", "gen_mask", "gen_mask.*", "vizualization", "vizualization.*"]),
    python_requires=">=3.11",  # the sweeps read TOML with the standard library's tomllib (3.11+)
    package_data={"gen_mask": ["sweeps/*.toml"]},
    install_requires=[
        "torch>=2.14.1",
        "torchvision>=0.29.1",
        "numpy>=1.26",
        "scipy>=1.11",
        "matplotlib>=3.8",
        "tqdm>=4.66",
    ],
    extras_require={
        "test": ["pytest>=8"],
        "cluster": ["submitit>=1.5"],  # --launcher slurm of gen_mask.sweep
    },
)

from setuptools import find_packages, setup

with open("requirements.txt") as f:
    requirements = [line.strip() for line in f if line.strip() and line.strip() != "pytest"]

setup(
    name="learning-explanations-hard-to-vary",
    version="0.1.0",
    description="AND-mask and other rules for combining per-environment gradients (Parascandolo et al., ICLR 2021).",
    packages=find_packages(include=["and_mask", "and_mask.*", "gen_mask", "gen_mask.*", "vizualization", "vizualization.*"]),
    python_requires=">=3.10",
    package_data={"gen_mask": ["sweeps/*.toml"]},
    install_requires=requirements,
    extras_require={"test": ["pytest"], "cluster": ["submitit"]},  # cluster: --launcher slurm of gen_mask.sweep
)

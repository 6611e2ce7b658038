"""flowsde: ODE/SDE solvers for flow-matching and diffusion models."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "flowsde" / "__init__.py").read_text()).group(1)

setup(
    name="flowsde",
    version=VERSION,
    description="ODE/SDE solvers for flow-matching and diffusion models, checked against torchdiffeq and torchsde",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["flowsde", "flowsde.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "numpy",
        "torchdiffeq>=0.2.3",
        "torchsde>=0.2.6",
        "scipy",
        "matplotlib",
        "tqdm",
        'triton; platform_system == "Linux"',
    ],
    extras_require={
        # diffusers: its flow-matching schedulers are peers in `flowsde bench` (skipped when absent)
        "diffusers": ["diffusers>=0.32"],
        "test": ["pytest>=7", "diffusers>=0.32"],
        "bench": ["pytest>=7", "pytest-benchmark>=4", "diffusers>=0.32"],
    },
    entry_points={"console_scripts": ["flowsde = flowsde.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Mathematics",
    ],
)

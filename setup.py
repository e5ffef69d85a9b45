from setuptools import find_packages, setup

setup(
    name="mdp_hf",
    version="0.1.0",
    description="Latency-constrained multi-dimensional structural pruning (MDP, CVPR 2025) for Hugging Face vision models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # hub_cards/ (model-card templates) lives at the top of the repo and installs as mdp_hf.hub_cards
    packages=find_packages(include=["mdp_hf", "mdp_hf.*"]) + ["mdp_hf.hub_cards"],
    package_dir={"mdp_hf.hub_cards": "hub_cards"},
    package_data={"mdp_hf.hub_cards": ["*.md"], "mdp_hf": ["metrics/*.py"]},
    python_requires=">=3.10",
    # Ranges, so that mdp_hf installs beside other libraries: the lower bound is the release it is tested with, the
    # upper bound the next major. CI installs exactly the tested versions from constraints.txt
    # (`pip install -e ".[test]" -c constraints.txt`, see .ci/run).
    install_requires=[
        "torch>=2.14.1,<3",
        "torchvision>=0.29.1,<1",
        "transformers>=5.24.0,<6",
        "accelerate>=1.15.0,<2",
        "datasets>=5.2.0,<6",
        "timm>=1.0.31,<2",
        "evaluate>=0.4.6,<1",
        "pyomo>=6.10.1,<7",
        "highspy>=1.16.0,<2",
        "safetensors>=0.8.0,<1",
        "huggingface_hub>=2.4.0,<3",
        "numpy>=2.4.6,<3",
        "scikit-learn>=1.9.1,<2",
        "matplotlib>=3.11.2,<4",
        "tqdm>=4.70.1,<5",
        "pyyaml>=6.0.3,<7",
    ],
    # detection: COCO mAP for recipes/prune_detector.py (torchmetrics MeanAveragePrecision on pycocotools)
    extras_require={
        # scipy: transformers' Hungarian matcher (the detectors' loss); also pulled in by scikit-learn
        "detection": ["torchmetrics>=1.9.0,<2", "pycocotools>=2.0.11,<3", "scipy>=1.17.1,<2"],
        "test": [
            "pytest>=9.0.3,<10",
            "pytest-xdist>=3.8.0,<4",
            "ruff>=0.17.6,<1",
            "torchmetrics>=1.9.0,<2",
            "pycocotools>=2.0.11,<3",
        ],
    },
    entry_points={"console_scripts": ["mdp-hf=mdp_hf.cli:main"]},
)

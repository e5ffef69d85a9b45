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
    # Pinned to what the code is tested with. torch is pinned exactly: a bare "torch" pulls a multi-GB
    # CUDA build on machines where this exact wheel is not cached.
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "transformers==5.24.0",
        "accelerate==1.15.0",
        "datasets==5.2.0",
        "timm==1.0.31",
        "evaluate==0.4.6",
        "pyomo==6.10.1",
        "highspy==1.16.0",
        "safetensors==0.8.0",
        "huggingface_hub==2.4.0",
        "numpy>=2.0",
        "scikit-learn>=1.5",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "pyyaml>=6.0",
    ],
    extras_require={"test": ["pytest>=8", "ruff==0.17.6"]},
    entry_points={"console_scripts": ["mdp-hf=mdp_hf.cli:main"]},
)

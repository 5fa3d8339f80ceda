"""Build and install hpctrain, including its native extension hpctrain._C.

The extension is built by CMake (CMakeLists.txt). It is required: if the compiler fails,
the install fails and prints the compiler's message, so a broken toolchain shows up at
install time on the login node instead of as an ImportError inside a Slurm job.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        configure = [
            "cmake", str(ROOT),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DHPCTRAIN_VERSION={VERSION}",
        ]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        # check_call: a compiler error propagates as a failed install with CMake's output.
        subprocess.check_call(configure, cwd=build_dir)
        subprocess.check_call(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir)


ASSET_PACKAGES = ["hpctrain.assets", "hpctrain.assets.configs", "hpctrain.assets.data"]

setup(
    name="hpctrain",
    version=VERSION,
    description="Fine-tune and pretrain Hugging Face LLMs with megatron-core on Slurm clusters",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The asset folders are data-only packages: listed so setuptools ships them without warnings.
    packages=find_packages(include=["hpctrain", "hpctrain.*"]) + ASSET_PACKAGES,
    package_data={name: ["*.md", "*.json", "*.jsonl"] for name in ASSET_PACKAGES},
    include_package_data=True,
    ext_modules=[CMakeExtension("hpctrain._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        # A range: users bring the torch build that matches their CUDA.
        "torch>=2.4,<3",
        "megatron-core>=0.16.1,<0.17",
        # megatron-core needs psutil for torch_dist saves but does not declare it;
        # without it a save hangs (the writer subprocess dies).
        "psutil",
        "numpy",
        "safetensors",
        "transformers>=4.45",
        "tokenizers",
        "datasets",
        "submitit>=1.5",
        "tensorboard",
        "tqdm",
        "pyarrow",
        "matplotlib",
    ],
    extras_require={
        # The dev/CI environment: a pinned CPU torch that lies on the CI machine's disk.
        "dev": [
            "torch==2.13.0",
            "pytest>=8",
            "hypothesis",
            "binpacking",
            "gguf",
            "accelerate",
            "pandas",
        ],
        # GGUF input (e.g. the SmolLM2 demo model) is dequantised by transformers.
        "gguf": ["gguf", "accelerate"],
    },
    entry_points={"console_scripts": ["hpctrain=hpctrain.cli:main"]},
)

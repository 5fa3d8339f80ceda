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
from setuptools.command.build_py import build_py

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


# What the README and the CLI point users at, shipped inside the wheel under hpctrain/assets/.
# The repository files stay the single source: they are copied into the build, never into the tree
# (hpctrain/bundled.py finds them in either place). MANIFEST.in puts them into the sdist.
BUNDLED = {
    "slurm": ["*.sbatch", "profiles/example-*.toml"],
    "docs": ["config.md", "slurm.md", "checkpoints.md", "compat.md"],
}


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        for folder, patterns in BUNDLED.items():
            for pattern in patterns:
                for src in sorted((ROOT / folder).glob(pattern)):
                    dst = Path(self.build_lib) / "hpctrain" / "assets" / folder / src.relative_to(ROOT / folder)
                    self.mkpath(str(dst.parent))
                    self.copy_file(str(src), str(dst))


ASSET_PACKAGES = ["hpctrain.assets", "hpctrain.assets.configs", "hpctrain.assets.data"]

setup(
    name="hpctrain",
    version=VERSION,
    description="Fine-tune and pretrain Hugging Face LLMs with megatron-core on Slurm clusters",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # 3.11: config/files.py reads TOML with the standard library's tomllib.
    python_requires=">=3.11",
    # The asset folders are data-only packages: listed so setuptools ships them without warnings.
    packages=find_packages(include=["hpctrain", "hpctrain.*"]) + ASSET_PACKAGES,
    package_data={name: ["*.md", "*.json", "*.jsonl"] for name in ASSET_PACKAGES},
    include_package_data=True,
    ext_modules=[CMakeExtension("hpctrain._C")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
    # Ranges that match what is tested (docs/compat.md); the exact CI versions live in
    # tools/constraints-ci.txt, never here: users bring their own torch/CUDA build.
    install_requires=[
        "torch>=2.6,<3",                  # megatron-core 0.16.1 needs torch >= 2.6
        "megatron-core>=0.16.1,<0.20",    # 0.16.1 (Python 3.11, CI) to 0.19.2 (Python 3.12); see train/compat.py
        # megatron-core needs psutil for torch_dist saves but does not declare it;
        # without it a save hangs (the writer subprocess dies).
        "psutil",
        "numpy>=1.24",
        "safetensors>=0.4",
        "transformers>=5.17,<6",          # oldest tested: 5.17 (GPU image); CI: 5.24
        "tokenizers",
        "datasets>=3",
        # launch/render.py calls submitit's private _make_sbatch_string: bounded to the tested minor.
        "submitit>=1.5,<1.6",
        "tensorboard",
        "pyarrow>=15",
    ],
    extras_require={
        # The loss/LR/grad-norm/throughput PNG (`hpctrain plot`, and after training).
        "plot": ["matplotlib>=3.7"],
        # Transformer Engine's layer spec, fused attention and FP8 (its torch part builds from source).
        "te": ["transformer-engine[pytorch]>=2.9"],
        # GGUF input (e.g. the SmolLM2 demo model) is dequantised by transformers.
        "gguf": ["gguf", "accelerate"],
        # Test tools. The CI versions (torch==2.13.0 CPU, ...) are pinned in tools/constraints-ci.txt.
        "dev": ["pytest>=8", "hypothesis", "binpacking", "pandas", "build", "matplotlib>=3.7", "gguf", "accelerate",
                "peft>=0.13,<1"],
    },
    entry_points={"console_scripts": ["hpctrain=hpctrain.cli:main"]},
)

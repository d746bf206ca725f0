#!/usr/bin/env bash
# Build kvgguf's native libraries with the CUDA backend: the pinned llama.cpp with patches/, ggml-cuda, llama and
# libkvgguf, with the same CMakeLists and flags as the wheel (what `CMAKE_ARGS="-DGGML_CUDA=ON" bash
# scripts/install.sh` compiles), into a build folder of its own so the CPU install in .venv is left alone.
# It fails on the first compiler error. Meant for two uses:
#   - a CPU-only machine with nvcc: prove that the patches and native/ compile for CUDA (one architecture);
#   - a GPU machine: `scripts/gpu_check.sh` installs what this builds.
#
#   bash scripts/build_cuda.sh                       # CMAKE_CUDA_ARCHITECTURES=90 (H100), ./build-cuda
#   CUDA_ARCH="80;90" KVGGUF_CUDA_BUILD=/tmp/b bash scripts/build_cuda.sh
#
# Prints the wall time at the end; the libraries are installed under $KVGGUF_CUDA_BUILD/install/kvgguf/lib.
set -euo pipefail
cd "$(dirname "$0")/.."

build=${KVGGUF_CUDA_BUILD:-$PWD/build-cuda}
arch=${CUDA_ARCH:-90}
jobs=${JOBS:-$(nproc)}
command -v nvcc >/dev/null || { echo "build_cuda.sh: nvcc not found (install the CUDA toolkit or put it on PATH)" >&2; exit 2; }
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && python=.venv/bin/python

# cuBLAS: ggml-cuda links it. A toolkit installed without it (nvcc alone, as on CI machines without a GPU) gets
# NVIDIA's own PyPI wheel of it, for the toolkit's major.minor, in the build folder (headers + shared libraries).
cuda_flags=()
cuda_home=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
if [ ! -e "$cuda_home/include/cublas_v2.h" ] && [ ! -e "$cuda_home/targets/x86_64-linux/include/cublas_v2.h" ]; then
    version=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1.\2/p')
    major=${version%%.*}
    cublas="$build/cublas"
    if [ ! -d "$cublas/nvidia/cu$major/lib" ]; then
        "$python" -m pip install --disable-pip-version-check --no-deps --target "$cublas" "nvidia-cublas==$version.*"
    fi
    lib="$cublas/nvidia/cu$major/lib"
    inc="$cublas/nvidia/cu$major/include"
    # (-rpath-link: executables that link libggml-cuda, ggml-rpc-server, find its libcublas at link time)
    cuda_flags=(-DCUDA_cublas_LIBRARY="$lib/libcublas.so.$major" -DCUDA_cublasLt_LIBRARY="$lib/libcublasLt.so.$major"
                -DCMAKE_CUDA_FLAGS="-isystem $inc" -DCMAKE_CXX_FLAGS="-isystem $inc"
                -DCMAKE_EXE_LINKER_FLAGS="-Wl,-rpath-link,$lib")
fi
# The driver library (libcuda.so, with the driver or the toolkit's stubs) is linked for the VMM memory pool. A machine
# with neither builds with ggml's own option that does without it (the legacy pool), and says so.
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so' && [ ! -e "$cuda_home/lib64/stubs/libcuda.so" ] \
        && [ ! -e "$cuda_home/targets/x86_64-linux/lib/stubs/libcuda.so" ]; then
    echo "build_cuda.sh: no libcuda.so (no driver, no stubs): building with GGML_CUDA_NO_VMM=ON" >&2
    cuda_flags+=(-DGGML_CUDA_NO_VMM=ON)
fi

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
start=$(date +%s)
# shellcheck disable=SC2086  # CMAKE_ARGS is a list of flags, as for pip
cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$python")" \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" "${cuda_flags[@]}" ${CMAKE_ARGS:-}
cmake --build "$build" --target kvgguf --parallel "$jobs"
cmake --install "$build" --prefix "$build/install" >/dev/null
end=$(date +%s)
ls -l "$build/install/kvgguf/lib"
nvcc --version | tail -1
echo "build_cuda.sh: built for CUDA architectures $arch with $jobs jobs on $(nproc) cores in $((end - start)) s"

#!/usr/bin/env bash
# llama.cpp's own C++ `llama-server`, the strongest CPU peer in `make bench-serve`, built from the llama.cpp
# source vendored in the llama-cpp-python sdist into .llama-cpp/ (git-ignored). Idempotent.
# -DGGML_NATIVE=OFF with explicit ISA flags: a -march=native build died with SIGILL on these virtual machines;
# AVX-512 flags are added only where /proc/cpuinfo lists them, so the binary runs on AVX2-only hosts too.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DEST="${LLAMA_CPP_DIR:-.llama-cpp}"
PYTHON="${PYTHON:-python3}"
BIN="$DEST/bin/llama-server"

flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo) "
has() { [[ "$cpu_flags" == *" $1 "* ]]; }
if has avx512f && has avx512bw && has avx512vl; then
    flags+=(-DGGML_AVX512=ON)
    has avx512_vnni && flags+=(-DGGML_AVX512_VNNI=ON)
    has avx512vbmi && flags+=(-DGGML_AVX512_VBMI=ON)
    has avx512_bf16 && flags+=(-DGGML_AVX512_BF16=ON)
fi
has avx_vnni && flags+=(-DGGML_AVX_VNNI=ON)
stamp="$VERSION ${flags[*]}"  # a binary built for another instruction set is rebuilt, not run into SIGILL

if [ -x "$BIN" ] && [ "$(cat "$DEST/bin/.stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "$BIN (llama-cpp-python $VERSION sources, ${flags[*]}) is built"
    exit 0
fi
echo "llama.cpp flags: ${flags[*]}"
for tool in cmake c++; do
    command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install cmake g++" >&2; exit 1; }
done

mkdir -p "$DEST/src"
sdist="$DEST/src/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
    "$PYTHON" -m pip download -q --no-binary :all: --no-deps \
        "llama-cpp-python==$VERSION" -d "$DEST/src"
fi
source_dir="$DEST/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -d "$source_dir" ] || tar -xzf "$sdist" -C "$DEST/src"


build="$DEST/build"  # kept: a change of flags recompiles only ggml's CPU backend
cmake -S "$source_dir" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF \
    -DGGML_OPENMP=ON "${flags[@]}" >"$DEST/cmake.log"
cmake --build "$build" --target llama-server -j "$(nproc)" >"$DEST/build.log"
mkdir -p "$DEST/bin"
cp "$build/bin/llama-server" "$BIN"
echo "$stamp" >"$DEST/bin/.stamp"
"$BIN" --version 2>&1 | tail -2
echo "built $BIN"

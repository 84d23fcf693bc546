#!/usr/bin/env bash
# Builds every C, C++ and CMake snippet of a Markdown file (README.md by
# default) against an INSTALLED cacheaside, and runs each program that has a
# `main`, so the README's code cannot rot. CI runs it after installing into
# a temporary prefix (.ci/run).
#
#   PKG_CONFIG_PATH=$prefix/lib/pkgconfig scripts/readme-examples.sh [FILE.md]
#
# - ```c blocks: compiled with `cc $(pkg-config --cflags --libs cacheaside)`.
# - ```cpp blocks: compiled with `c++ -std=c++17` the same way.
# - A ```cmake block: used as the CMakeLists.txt of a project whose app.cpp
#   is the file's last ```cpp block, configured with CMAKE_PREFIX_PATH set
#   to pkg-config's prefix, built and run.
# Compiler warnings are errors. Nothing of the source tree is on any path.
set -euo pipefail

file=${1:-README.md}
pkg-config --exists --print-errors cacheaside
prefix=$(pkg-config --variable=prefix cacheaside)
libdir=$(pkg-config --variable=libdir cacheaside)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One file per fenced block: $work/N.<lang>.
awk -v dir="$work" '
  /^```(c|cpp|cmake)[[:space:]]*$/ && !out { n++; lang = substr($0, 4); gsub(/[[:space:]]/, "", lang); out = dir "/" n "." lang; next }
  /^```/ && out { close(out); out = ""; next }
  out { print > out }
' "$file"

shopt -s nullglob
blocks=("$work"/*.c "$work"/*.cpp "$work"/*.cmake)
if [ ${#blocks[@]} -eq 0 ]; then
  echo "no C, C++ or CMake snippet in $file" >&2
  exit 1
fi

# shellcheck disable=SC2046 # pkg-config prints a list of flags
build_and_run() {
  local src=$1 compiler=$2 std=$3 exe=${1%.*}
  echo "==> $(basename "$src"): $compiler -std=$std"
  "$compiler" -std="$std" -Wall -Wextra -Werror "$src" -o "$exe" \
    $(pkg-config --cflags --libs cacheaside) -pthread -Wl,-rpath,"$libdir"
  if grep -q 'main(' "$src"; then
    "$exe"
  fi
}

last_cpp=
for src in "$work"/*.c; do build_and_run "$src" cc c11; done
for src in "$work"/*.cpp; do build_and_run "$src" c++ c++17; last_cpp=$src; done

for cmake_file in "$work"/*.cmake; do
  if [ -z "$last_cpp" ]; then
    echo "a CMake snippet but no C++ program to build with it" >&2
    exit 1
  fi
  project=$work/cmake-$(basename "$cmake_file" .cmake)
  mkdir "$project"
  cp "$cmake_file" "$project/CMakeLists.txt"
  cp "$last_cpp" "$project/app.cpp"
  echo "==> $(basename "$cmake_file"): cmake with app.cpp = $(basename "$last_cpp")"
  cmake -S "$project" -B "$project/build" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
  cmake --build "$project/build" >/dev/null
  "$project/build/app"
done

echo "all ${#blocks[@]} snippets of $file built and ran"

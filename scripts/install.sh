#!/usr/bin/env bash
# Installs cacheaside's C library under a prefix, for C and C++ programs:
#
#   <includedir>/cacheaside.h, cacheaside.hpp
#   <libdir>/libcacheaside.so.X.Y.Z          the shared library, SONAME
#            libcacheaside.so.<abi> -> ...   libcacheaside.so.<abi> (0.MINOR
#            libcacheaside.so -> ...         before 1.0, MAJOR after)
#   <libdir>/libcacheaside.a                 the static library
#   <libdir>/pkgconfig/cacheaside.pc         pkg-config --cflags --libs cacheaside
#   <libdir>/cmake/cacheaside/cacheasideConfig.cmake, ...ConfigVersion.cmake
#                                            find_package(cacheaside 0.1)
#
# Usage (docs/install.md has the rest):
#
#   scripts/install.sh [--prefix DIR] [--libdir DIR] [--includedir DIR] [--destdir DIR]
#
# PREFIX (default /usr/local), LIBDIR (default PREFIX/lib; relative means
# under PREFIX), INCLUDEDIR (default PREFIX/include) and DESTDIR (a staging
# root for packagers, prepended to every path but not written into the
# pkg-config and CMake files) may also come from the environment; the
# options win. CARGO and RUSTC pick the tools; CARGO_TARGET_DIR is honoured.
#
# It builds with `cargo build --release --lib` (capi on; CACHEASIDE_SONAME=1
# so build.rs gives the shared library its SONAME), installs the header that
# build generated (so header and library always match), and prints every
# path it wrote. ELF platforms only (Linux, the BSDs).
#
# Why a script and not cargo-c (`cargo cinstall`), the usual tool for this:
# cargo-c is not installed here, and installing it means fetching and
# compiling a few hundred crates on every fresh developer and CI machine,
# where this needs nothing but cargo, rustc and coreutils. What it writes
# follows cargo-c's layout and SONAME rule, so switching later is easy.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

prefix=${PREFIX:-/usr/local}
libdir=${LIBDIR:-}
includedir=${INCLUDEDIR:-}
destdir=${DESTDIR:-}
while [ $# -gt 0 ]; do
  case $1 in
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --prefix=*) prefix=${1#*=}; shift ;;
    --libdir) libdir=${2:?--libdir needs a directory}; shift 2 ;;
    --libdir=*) libdir=${1#*=}; shift ;;
    --includedir) includedir=${2:?--includedir needs a directory}; shift 2 ;;
    --includedir=*) includedir=${1#*=}; shift ;;
    --destdir) destdir=${2:?--destdir needs a directory}; shift 2 ;;
    --destdir=*) destdir=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

case $(uname -s) in
  Linux|FreeBSD|NetBSD|OpenBSD|DragonFly) ;;
  *) die "$(uname -s) is not supported yet (ELF platforms only: the SONAME and symlinks are ELF's)" ;;
esac

# Absolute paths: they go into cacheaside.pc and the CMake files.
case $prefix in /*) ;; *) prefix=$(pwd -P)/$prefix ;; esac
libdir=${libdir:-lib}
case $libdir in /*) ;; *) libdir=$prefix/$libdir ;; esac
includedir=${includedir:-include}
case $includedir in /*) ;; *) includedir=$prefix/$includedir ;; esac
if [ -n "$destdir" ]; then
  case $destdir in /*) ;; *) destdir=$(pwd -P)/$destdir ;; esac
fi

cd "$(dirname "$0")/.."
cargo=${CARGO:-cargo}
rustc=${RUSTC:-rustc}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ---- build ------------------------------------------------------------------
echo "install.sh: cargo build --release --lib" >&2
pkgid=$("$cargo" pkgid)
CACHEASIDE_SONAME=1 "$cargo" build --release --lib --features capi \
  --message-format=json-render-diagnostics >"$work/messages"

# The package's own messages, by its package id (paths are absolute).
grep -F "\"package_id\":\"$pkgid\"" "$work/messages" >"$work/ours" || true
field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }
out_dir=$(grep -F '"reason":"build-script-executed"' "$work/ours" | field out_dir | tail -n 1)
artifacts=$(grep -F '"reason":"compiler-artifact"' "$work/ours" | grep -F '"cdylib"' | tail -n 1 |
  sed -n 's/.*"filenames":\[\([^]]*\)\].*/\1/p' | tr ',' '\n' | tr -d '"')
shared=$(printf '%s\n' "$artifacts" | grep '/libcacheaside\.so$' || true)
static=$(printf '%s\n' "$artifacts" | grep '/libcacheaside\.a$' || true)
header=${out_dir:+$out_dir/cacheaside.h}
[ -f "$shared" ] || die "cargo did not report libcacheaside.so"
[ -f "$static" ] || die "cargo did not report libcacheaside.a"
[ -f "$header" ] || die "build.rs generated no header (see its warnings above)"

# The version, and the ABI version the SONAME carries (build.rs's rule).
macro() { sed -n "s/^#define CACHEASIDE_VERSION$1 \"\{0,1\}\([^\"]*\)\"\{0,1\}$/\1/p" "$header"; }
version=$(macro '') major=$(macro _MAJOR) minor=$(macro _MINOR) patch=$(macro _PATCH)
[ "$version" = "$major.$minor.$patch" ] || die "cannot read the version macros of $header"
case $major.$minor in
  0.0) abi=0.0.$patch ;;
  0.*) abi=0.$minor ;;
  *) abi=$major ;;
esac
soname=libcacheaside.so.$abi
if command -v readelf >/dev/null; then
  case $(readelf -d "$shared") in
    *"[$soname]"*) ;;
    *) die "$shared has no SONAME $soname" ;;
  esac
fi

# What a static link needs besides libcacheaside.a: the standard library's
# system libraries (rustc prints them for any staticlib; an empty crate is
# enough) and the shared libraries a dependency's build script links. Its
# static ones (ring's C code, say) are bundled into libcacheaside.a already.
: >"$work/empty.rs"
native=$("$rustc" --crate-type staticlib --crate-name probe --print native-static-libs \
  -o "$work/probe.a" "$work/empty.rs" 2>&1 | sed -n 's/.*native-static-libs: //p')
for lib in $(grep -F '"reason":"build-script-executed"' "$work/messages" |
  sed -n 's/.*"linked_libs":\[\([^]]*\)\].*/\1/p' | tr ',' '\n' | tr -d '"' |
  grep -v '^static' | sed 's/^[a-z:+-]*=//'); do
  case " $native " in *" -l$lib "*) ;; *) native="-l$lib $native" ;; esac
done

# For the CMake version file: a library for another pointer width is no use.
pointer_bits=$("$rustc" --print cfg | sed -n 's/^target_pointer_width="\(.*\)"$/\1/p')

# ---- install ----------------------------------------------------------------
installed=()
put() { # put MODE SOURCE DEST
  install -D -m "$1" "$2" "$destdir$3"
  installed+=("$destdir$3")
}
link() { # link TARGET NAME
  ln -sfn "$1" "$destdir$2"
  installed+=("$destdir$2 -> $1")
}
# pkg-config variables relative to ${prefix} where they can be, so the file
# reads like every other .pc file.
# shellcheck disable=SC2016 # ${prefix} is pkg-config's, not ours
under_prefix() { case $1 in "$prefix"/*) printf '${prefix}/%s' "${1#"$prefix"/}" ;; *) printf '%s' "$1" ;; esac; }

put 644 "$header" "$includedir/cacheaside.h"
put 644 include/cacheaside.hpp "$includedir/cacheaside.hpp"
put 755 "$shared" "$libdir/libcacheaside.so.$version"
[ "$abi" = "$version" ] || link "libcacheaside.so.$version" "$libdir/$soname"
link "$soname" "$libdir/libcacheaside.so"
put 644 "$static" "$libdir/libcacheaside.a"

cat >"$work/cacheaside.pc" <<EOF
prefix=$prefix
exec_prefix=\${prefix}
libdir=$(under_prefix "$libdir")
includedir=$(under_prefix "$includedir")

Name: cacheaside
Description: Redis in front of PostgreSQL with the cache-aside pattern (C ABI)
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -lcacheaside
Libs.private: $native
EOF
put 644 "$work/cacheaside.pc" "$libdir/pkgconfig/cacheaside.pc"

cmake_libs=$(for flag in $native; do printf '%s;' "${flag#-l}"; done)
cat >"$work/cacheasideConfig.cmake" <<EOF
# cacheaside $version, installed by scripts/install.sh.
#
#   find_package(cacheaside $major.$minor REQUIRED)
#   target_link_libraries(app PRIVATE cacheaside::cacheaside)         # libcacheaside.so
#   target_link_libraries(app PRIVATE cacheaside::cacheaside_static)  # libcacheaside.a
#
# Both targets carry the include directory (cacheaside.h, cacheaside.hpp).
if(TARGET cacheaside::cacheaside)
  return()
endif()

set(cacheaside_INCLUDE_DIR "$includedir")
set(cacheaside_LIBRARY "$libdir/libcacheaside.so.$version")
set(cacheaside_STATIC_LIBRARY "$libdir/libcacheaside.a")

add_library(cacheaside::cacheaside SHARED IMPORTED)
set_target_properties(cacheaside::cacheaside PROPERTIES
  IMPORTED_LOCATION "\${cacheaside_LIBRARY}"
  IMPORTED_SONAME "$soname"
  INTERFACE_INCLUDE_DIRECTORIES "\${cacheaside_INCLUDE_DIR}")

# A static link also needs the system libraries the Rust standard library uses.
add_library(cacheaside::cacheaside_static STATIC IMPORTED)
set_target_properties(cacheaside::cacheaside_static PROPERTIES
  IMPORTED_LOCATION "\${cacheaside_STATIC_LIBRARY}"
  INTERFACE_INCLUDE_DIRECTORIES "\${cacheaside_INCLUDE_DIR}"
  INTERFACE_LINK_LIBRARIES "${cmake_libs%;}")
EOF
put 644 "$work/cacheasideConfig.cmake" "$libdir/cmake/cacheaside/cacheasideConfig.cmake"

if [ "$major" = 0 ]; then
  other_series="NOT PACKAGE_FIND_VERSION_MAJOR STREQUAL \"0\" OR NOT PACKAGE_FIND_VERSION_MINOR STREQUAL \"$minor\""
else
  other_series="NOT PACKAGE_FIND_VERSION_MAJOR STREQUAL \"$major\""
fi
cat >"$work/cacheasideConfigVersion.cmake" <<EOF
# Which find_package(cacheaside <version>) requests cacheaside $version meets.
# Cargo's rule (and the SONAME's): before 1.0 a minor version may break the
# API, so 0.MINOR.x meets requests for 0.MINOR.y with y <= x only; from 1.0
# on, the same major version.
set(PACKAGE_VERSION "$version")
if("\${PACKAGE_FIND_VERSION}" STREQUAL "")
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
elseif(PACKAGE_VERSION VERSION_LESS PACKAGE_FIND_VERSION)
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
elseif($other_series)
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
else()
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
  if(PACKAGE_FIND_VERSION STREQUAL PACKAGE_VERSION)
    set(PACKAGE_VERSION_EXACT TRUE)
  endif()
endif()
# A library for another pointer width is no use.
if(CMAKE_SIZEOF_VOID_P AND NOT CMAKE_SIZEOF_VOID_P STREQUAL "$((pointer_bits / 8))")
  set(PACKAGE_VERSION "\${PACKAGE_VERSION} ($pointer_bits-bit)")
  set(PACKAGE_VERSION_UNSUITABLE TRUE)
endif()
EOF
put 644 "$work/cacheasideConfigVersion.cmake" "$libdir/cmake/cacheaside/cacheasideConfigVersion.cmake"

echo "install.sh: installed cacheaside $version (SONAME $soname):"
printf '  %s\n' "${installed[@]}"

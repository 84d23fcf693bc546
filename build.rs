//! The C ABI's build-time half: the header, and the shared library's SONAME.
//!
//! Without the `capi` feature this script does nothing (and cbindgen, an
//! optional build-dependency, is not even built).
//!
//! With it, cbindgen generates the header from `src/ffi/` into
//! `$OUT_DIR/cacheaside.h` on every build; `scripts/install.sh` installs that
//! copy, so an installed header always matches the installed library.
//! `include/cacheaside.h` is the checked-in copy of the same text, for
//! readers and for programs built against the source tree. A normal build
//! never writes into the source directory: `cargo package` refuses a build
//! script that does, and a crate unpacked from a registry may be read-only.
//! So the checked-in copy is rewritten only on request, with
//! `CACHEASIDE_WRITE_HEADER=1` (and then only when its content changes, so
//! an unchanged header keeps its mtime and does not rebuild C programs); CI
//! sets it and fails on `git diff --exit-code include/`. Without it, a stale
//! checked-in copy earns a cargo warning.
//!
//! If cbindgen fails, the build goes on with a warning (a user building the
//! crate must not be stopped by the header generator) and no header in
//! `OUT_DIR`; with `CACHEASIDE_WRITE_HEADER=1` (CI) it fails the build.
//!
//! `CACHEASIDE_SONAME=1` gives `libcacheaside.so` a versioned SONAME
//! (`libcacheaside.so.0.1` for 0.1.x), as an installed library needs. It is
//! opt-in, set by `scripts/install.sh`: a program linked against a library
//! with a SONAME asks the loader for that name, which only an installed
//! library's symlinks provide, so the Makefile, the C tests and anyone
//! linking straight against `target/<profile>/` use the plain library.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "capi")]
    capi::main();
}

#[cfg(feature = "capi")]
mod capi {
    use std::env;
    use std::fs;
    use std::path::{Path, PathBuf};

    pub fn main() {
        println!("cargo:rerun-if-env-changed=CACHEASIDE_SONAME");
        header();
        if env::var("CACHEASIDE_SONAME").is_ok_and(|v| v == "1") {
            soname();
        }
    }

    /// Generates the header into `OUT_DIR`, and checks or rewrites the
    /// checked-in copy.
    fn header() {
        println!("cargo:rerun-if-changed=src/ffi");
        println!("cargo:rerun-if-changed=cbindgen.toml");
        // The version macros come from the package version.
        println!("cargo:rerun-if-changed=Cargo.toml");
        // Compare (or rewrite) again when someone edits the checked-in copy.
        println!("cargo:rerun-if-changed=include/cacheaside.h");
        println!("cargo:rerun-if-env-changed=CACHEASIDE_WRITE_HEADER");

        // Asked for explicitly (CI, a developer regenerating the header), a
        // failure is an error; otherwise it is only a warning.
        let write = env::var("CACHEASIDE_WRITE_HEADER").is_ok_and(|v| v == "1");
        let fail = |message: String| {
            if write {
                panic!("{message}");
            }
            warn(&message);
        };
        let (Some(crate_dir), Some(out_dir)) =
            (env::var_os("CARGO_MANIFEST_DIR"), env::var_os("OUT_DIR"))
        else {
            return fail("CARGO_MANIFEST_DIR or OUT_DIR is not set; header not generated".into());
        };
        let crate_dir = PathBuf::from(crate_dir);
        let generated = Path::new(&out_dir).join("cacheaside.h");
        // cbindgen may panic on input it does not understand; that must not
        // fail a user's build either.
        let text = match std::panic::catch_unwind(|| generate(&crate_dir))
            .unwrap_or_else(|_| Err("cbindgen panicked".to_owned()))
        {
            Ok(text) => text,
            Err(err) => {
                // No header rather than a stale one from an earlier run, so
                // scripts/install.sh stops instead of installing it.
                let _ = fs::remove_file(&generated);
                return fail(format!("cbindgen failed, header not generated: {err}"));
            }
        };
        if let Err(err) = write_if_changed(&generated, &text) {
            fail(format!("could not write {}: {err}", generated.display()));
        }

        let checked_in = crate_dir.join("include").join("cacheaside.h");
        if write {
            if let Err(err) = write_if_changed(&checked_in, &text) {
                fail(format!("could not write {}: {err}", checked_in.display()));
            }
        } else if !fs::read(&checked_in).is_ok_and(|old| old == text) {
            warn(&format!(
                "{} is out of date with src/ffi/: regenerate it with \
                 `CACHEASIDE_WRITE_HEADER=1 cargo build`",
                checked_in.display()
            ));
        }
    }

    fn generate(crate_dir: &Path) -> Result<Vec<u8>, String> {
        let mut config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))?;
        // The version macros, then cbindgen.toml's own `after_includes`.
        let own = config.after_includes.take().unwrap_or_default();
        config.after_includes = Some(version_macros()? + &own);
        let bindings = cbindgen::Builder::new()
            .with_crate(crate_dir)
            .with_config(config)
            .generate()
            .map_err(|e| e.to_string())?;
        let mut text = Vec::new();
        bindings.write(&mut text);
        Ok(text)
    }

    /// `CACHEASIDE_VERSION_{MAJOR,MINOR,PATCH}` and `CACHEASIDE_VERSION`, from
    /// the package version, so C code can check at compile time what it builds
    /// against (and compare with `cacheaside_version()` at run time).
    fn version_macros() -> Result<String, String> {
        let var = |name: &str| env::var(name).map_err(|_| format!("{name} is not set"));
        Ok(format!(
            "\n/** The version of cacheaside this header belongs to. */\n\
             #define CACHEASIDE_VERSION_MAJOR {}\n\
             #define CACHEASIDE_VERSION_MINOR {}\n\
             #define CACHEASIDE_VERSION_PATCH {}\n\
             #define CACHEASIDE_VERSION \"{}\"",
            var("CARGO_PKG_VERSION_MAJOR")?,
            var("CARGO_PKG_VERSION_MINOR")?,
            var("CARGO_PKG_VERSION_PATCH")?,
            var("CARGO_PKG_VERSION")?,
        ))
    }

    fn write_if_changed(path: &Path, text: &[u8]) -> std::io::Result<()> {
        if fs::read(path).is_ok_and(|old| old == text) {
            return Ok(());
        }
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        // Write a sibling and rename it over the header, so a C compiler
        // running at the same time never reads half a file.
        let tmp = path.with_extension(format!("h.tmp.{}", std::process::id()));
        fs::write(&tmp, text)?;
        fs::rename(&tmp, path)
    }

    /// The library's ABI version as the loader sees it: `MAJOR` from 1.0 on;
    /// `0.MINOR` (and `0.0.PATCH`) before, because Cargo treats 0.1 → 0.2 as
    /// a breaking change, so it must not satisfy a program built against 0.1
    /// (cargo-c's convention too). `scripts/install.sh` computes the same.
    fn abi_version(major: &str, minor: &str, patch: &str) -> String {
        match (major, minor) {
            ("0", "0") => format!("0.0.{patch}"),
            ("0", _) => format!("0.{minor}"),
            _ => major.to_owned(),
        }
    }

    fn soname() {
        // A SONAME is an ELF notion; other targets keep the linker's default.
        let elf = matches!(
            env::var("CARGO_CFG_TARGET_OS").as_deref(),
            Ok("linux" | "android" | "freebsd" | "netbsd" | "openbsd" | "dragonfly" | "illumos")
        );
        if !elf {
            return warn("CACHEASIDE_SONAME=1 is only supported on ELF targets; ignored");
        }
        let var = |name: &str| env::var(name).unwrap_or_default();
        let abi = abi_version(
            &var("CARGO_PKG_VERSION_MAJOR"),
            &var("CARGO_PKG_VERSION_MINOR"),
            &var("CARGO_PKG_VERSION_PATCH"),
        );
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcacheaside.so.{abi}");
    }

    fn warn(message: &str) {
        println!("cargo:warning={message}");
    }
}

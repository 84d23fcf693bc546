//! Generates `include/cacheaside.h` from `src/ffi/` with cbindgen.
//!
//! The header is a checked-in artifact: this script rewrites it only when
//! its content changes (so an unchanged header keeps its mtime and does not
//! rebuild C programs), and CI fails when regenerating it changes the file.
//! Writing only on change also keeps `cargo package`'s check that a build
//! script does not modify the source directory happy.
//! If cbindgen fails, the build goes on with a warning: a user building the
//! crate must not be stopped by the header generator; CI catches the stale
//! header instead.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=build.rs");
    // The version macros come from the package version.
    println!("cargo:rerun-if-changed=Cargo.toml");
    // Regenerate when someone edits or deletes the header by hand (it is
    // then rewritten, once: an unchanged header is not touched again).
    println!("cargo:rerun-if-changed=include/cacheaside.h");

    let crate_dir = match env::var("CARGO_MANIFEST_DIR") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => return warn("CARGO_MANIFEST_DIR is not set; header not generated"),
    };
    let header = crate_dir.join("include").join("cacheaside.h");
    // cbindgen may panic on input it does not understand; that must not
    // fail the build either.
    let generated = std::panic::catch_unwind(|| generate(&crate_dir))
        .unwrap_or_else(|_| Err("cbindgen panicked".to_owned()));
    match generated {
        Ok(text) => {
            if let Err(err) = write_if_changed(&header, &text) {
                warn(&format!("could not write {}: {err}", header.display()));
            }
        }
        Err(err) => warn(&format!(
            "cbindgen failed, {} not regenerated: {err}",
            header.display()
        )),
    }
}

fn generate(crate_dir: &Path) -> Result<Vec<u8>, String> {
    let mut config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))?;
    config.after_includes = Some(version_macros()?);
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
    // Write a sibling and rename it over the header, so a C compiler running
    // at the same time never reads half a file.
    let tmp = path.with_extension(format!("h.tmp.{}", std::process::id()));
    fs::write(&tmp, text)?;
    fs::rename(&tmp, path)
}

fn warn(message: &str) {
    println!("cargo:warning={message}");
}

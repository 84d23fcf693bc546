//! The C ABI from C and C++: compiles each program under `tests/c/` and
//! `tests/cpp/` with `-Wall -Wextra -Werror` against the cdylib and
//! `include/`, runs it with a table and namespace of its own, and expects
//! exit code 0. Also checks the generated header itself.
//!
//! Needs `cc` and `c++` (C11, C++17) besides Postgres and Redis.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use cacheaside::{Cache, Config, Db};

mod common;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

fn manifest_path(relative: &str) -> PathBuf {
    Path::new(MANIFEST_DIR).join(relative)
}

/// `<target>/<profile>`: this test binary is `<target>/<profile>/deps/c_abi-*`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in <target>/<profile>/deps")
        .to_path_buf()
}

/// The directory holding a `libcacheaside.so` built from the current source.
///
/// `cargo test` builds the library for the tests but does not promise to
/// put the cdylib in `<target>/<profile>/`, so build it explicitly, with this
/// run's profile and features (so nothing is rebuilt when the test build
/// already made it). Done once per test process.
fn lib_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = profile_dir();
        let target_dir = dir.parent().expect("<target> above <profile>");
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev".to_owned(),
            Some(other) => other.to_owned(),
            None => panic!("unexpected profile directory {}", dir.display()),
        };
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .current_dir(MANIFEST_DIR)
            .args(["build", "--lib", "--profile", &profile, "--target-dir"])
            .arg(target_dir);
        if cfg!(feature = "test-hooks") {
            cargo.args(["--features", "test-hooks"]);
        }
        let status = cargo.status().expect("run cargo build --lib");
        assert!(status.success(), "cargo build --lib failed: {status}");
        let lib = dir.join(format!(
            "{}cacheaside{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        ));
        assert!(lib.exists(), "{} was not built", lib.display());
        dir
    })
}

/// A table and namespace no other test uses; dropped (table) and emptied
/// (namespace) on drop, also when the test fails.
struct Scratch {
    table: String,
    outbox: String,
    namespace: String,
}

impl Scratch {
    fn new(lang: &str) -> Scratch {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let id = format!("{}_{nanos}_{n}", std::process::id());
        Scratch {
            table: format!("ca_{lang}_{id}"),
            outbox: format!("ca_{lang}_{id}_outbox"),
            namespace: format!("ca-{lang}-{id}:"),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut config = Config::from_env();
        if config.set_namespace(&self.namespace).is_err() {
            return;
        }
        // Best effort: a failure here must not hide the test's own verdict.
        if let Ok(db) = Db::connect(&config) {
            let _ = db.batch_execute(&format!(
                "DROP TABLE IF EXISTS {table}, {outbox}_cursors, {outbox};
                 DROP FUNCTION IF EXISTS {outbox}_capture(), {outbox}_bump();",
                table = self.table,
                outbox = self.outbox
            ));
        }
        if let Ok(cache) = Cache::connect(&config) {
            let _ = cache.delete_namespace();
        }
    }
}

/// Compiles `source` (C11 or C++17 by its extension) into `out`.
fn compile(source: &Path, out: &Path) {
    let cpp = source.extension().is_some_and(|e| e == "cpp");
    let (compiler, std) = if cpp {
        (
            std::env::var("CXX").unwrap_or_else(|_| "c++".into()),
            "-std=c++17",
        )
    } else {
        (
            std::env::var("CC").unwrap_or_else(|_| "cc".into()),
            "-std=c11",
        )
    };
    let lib = lib_dir();
    let output = Command::new(&compiler)
        .args([
            std,
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-g",
            "-pthread",
        ])
        .arg("-I")
        .arg(manifest_path("include"))
        .arg("-I")
        .arg(source.parent().expect("source directory"))
        .arg(source)
        .arg("-o")
        .arg(out)
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lcacheaside", "-lm"])
        .args(libpq_flags(source))
        .output()
        .unwrap_or_else(|e| panic!("run {compiler}: {e}"));
    assert!(
        output.status.success(),
        "{compiler} failed on {}:\n{}",
        source.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The compiler flags for libpq when `source` includes it (a program that
/// reads its own table, as an application would), from `pkg-config`.
fn libpq_flags(source: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(source).unwrap_or_default();
    if !text.contains("#include <libpq-fe.h>") {
        return Vec::new();
    }
    let output = Command::new("pkg-config")
        .args(["--cflags", "--libs", "libpq"])
        .output()
        .unwrap_or_else(|e| panic!("run pkg-config for libpq: {e}"));
    assert!(
        output.status.success(),
        "{} needs libpq (apt-get install libpq-dev pkg-config)",
        source.display()
    );
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Compiles and runs one program from `tests/c` or `tests/cpp` on a table
/// and namespace of its own; panics unless it exits with 0.
fn run_program(relative: &str) {
    run_program_under(relative, &[]);
}

/// `valgrind` with the options CI uses: errors (invalid reads and writes,
/// uninitialised values) and definite leaks fail the run. `None` when
/// valgrind is not installed.
fn valgrind() -> Option<Vec<&'static str>> {
    let installed = Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    installed.then(|| {
        vec![
            "valgrind",
            "--error-exitcode=1",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "--show-leak-kinds=definite",
            "--quiet",
        ]
    })
}

/// [`run_program`], with the program started by `wrapper` (e.g. valgrind
/// and its options) when it is not empty.
fn run_program_under(relative: &str, wrapper: &[&str]) {
    run_program_on(relative, wrapper, None);
}

/// [`run_program_under`], with `REDIS_URL` set to `redis_url` when given
/// (say, a cluster's nodes) instead of the environment's.
fn run_program_on(relative: &str, wrapper: &[&str], redis_url: Option<&str>) {
    let source = manifest_path(relative);
    let lang = if relative.ends_with(".cpp") {
        "cpp"
    } else {
        "c"
    };
    let scratch = Scratch::new(lang);
    let bin_dir = profile_dir().join("c-abi-tests");
    std::fs::create_dir_all(&bin_dir).expect("create the test binaries' directory");
    let stem = source
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("file name");
    // Unique per run: one program may run twice at once (plain, valgrind).
    static RUNS: AtomicU32 = AtomicU32::new(0);
    let bin = bin_dir.join(format!(
        "{lang}_{stem}_{}_{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    compile(&source, &bin);

    let config = Config::from_env();
    let mut command = match wrapper.split_first() {
        Some((tool, args)) => {
            let mut command = Command::new(tool);
            command.args(args).arg(&bin);
            command
        }
        None => Command::new(&bin),
    };
    let mut child = command
        .env("DATABASE_URL", &config.database_url)
        .env("REDIS_URL", redis_url.unwrap_or(&config.redis_url))
        .env("CACHEASIDE_TEST_TABLE", &scratch.table)
        .env("CACHEASIDE_TEST_NAMESPACE", &scratch.namespace)
        .env("CACHEASIDE_TEST_OUTBOX", &scratch.outbox)
        .env("CACHEASIDE_TEST_DOWN_REDIS", refused_redis_url())
        .env(
            "CACHEASIDE_TEST_SLOW",
            if wrapper.is_empty() { "" } else { "1" },
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the test program");
    let stdout = serve_sql_requests(&mut child, &config);
    let output = child.wait_with_output().expect("wait for the test program");
    let _ = std::fs::remove_file(&bin);
    assert!(
        output.status.success(),
        "{relative} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A Redis URL whose port refuses connections (nothing listens there).
fn refused_redis_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = listener.local_addr().expect("its address").port();
    drop(listener);
    format!("redis://127.0.0.1:{port}/")
}

/// Reads the program's stdout; a line `SQL: <statement>` asks the harness
/// to run the statement on a connection of its own (a write that bypasses
/// the library), after which it answers `done` on the program's stdin.
/// Returns everything the program printed.
fn serve_sql_requests(child: &mut std::process::Child, config: &Config) -> String {
    use std::io::{BufRead, Write};
    let Some(out) = child.stdout.take() else {
        return String::new();
    };
    let mut stdin = child.stdin.take();
    let mut printed = String::new();
    for line in std::io::BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        if let Some(sql) = line.strip_prefix("SQL: ") {
            let db = Db::connect(config).expect("a pool for the harness");
            db.batch_execute(sql)
                .unwrap_or_else(|e| panic!("the program's SQL failed: {}", e.chain()));
            if let Some(stdin) = stdin.as_mut() {
                let _ = writeln!(stdin, "done").and_then(|()| stdin.flush());
            }
        }
        printed.push_str(&line);
        printed.push('\n');
    }
    printed
}

#[test]
fn c_redis_outage_degrades_to_postgres() {
    run_program("tests/c/outage.c");
}

#[test]
fn c_direct_sql_update_reaches_the_cache_through_the_relay() {
    run_program("tests/c/relay.c");
}

#[test]
fn c_users_miss_hit_update_and_single_flight() {
    run_program("tests/c/users.c");
}

/// The same C lab (miss = 1 query, hits = 0, invalidation, NOT_FOUND, 50
/// pthreads on a cold key = 1 query) with `REDIS_URL` listing the nodes of
/// a 3-master Redis Cluster of the test's own.
#[test]
fn c_users_on_a_redis_cluster() {
    let cluster = common::servers::PrivateCluster::start();
    run_program_on("tests/c/users.c", &[], Some(&cluster.url()));
}

#[test]
fn c_near_cache_setter_hits_and_stats() {
    run_program("tests/c/near.c");
}

#[test]
fn c_bad_input_returns_status_without_crashing() {
    run_program("tests/c/bad_input.c");
}

#[test]
fn c_engine_caches_its_own_table_single_flight_and_captured() {
    run_program("tests/c/engine.c");
}

/// Batch reads and invalidation on the engine handle: order, absent rows,
/// one loader call for the misses, none for hits, bad input.
#[test]
fn c_engine_batch_reads_and_invalidation() {
    run_program("tests/c/batch.c");
}

/// The engine handle's C program again under valgrind, when it is
/// installed: loaders, binary values, write-through, every failure path.
#[test]
fn c_engine_under_valgrind() {
    match valgrind() {
        Some(wrapper) => run_program_under("tests/c/engine.c", &wrapper),
        None => eprintln!("valgrind is not installed: skipped"),
    }
}

#[test]
fn c_deprecated_names_forward_to_the_renamed_functions() {
    run_program("tests/c/deprecated.c");
}

/// Using an old name is a compiler warning that names the new one (here an
/// error, with `-Werror`), unless the program opts out.
#[test]
fn c_deprecated_names_warn_with_the_new_name() {
    let dir = profile_dir().join("c-abi-tests");
    std::fs::create_dir_all(&dir).expect("create the test binaries' directory");
    let source = dir.join(format!("uses_old_name_{}.c", std::process::id()));
    std::fs::write(
        &source,
        "#include \"cacheaside.h\"\n\
         int main(void) { return (int)cacheaside_install_schema(0); }\n",
    )
    .expect("write the program");
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let output = Command::new(&compiler)
        .args(["-std=c11", "-Wall", "-Werror", "-fsyntax-only", "-I"])
        .arg(manifest_path("include"))
        .arg(&source)
        .output()
        .unwrap_or_else(|e| panic!("run {compiler}: {e}"));
    let _ = std::fs::remove_file(&source);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "an old name compiled silently");
    assert!(
        stderr.contains("renamed cacheaside_client_install_schema"),
        "{stderr}"
    );
}

#[test]
fn c_get_or_load_runs_the_loader_once() {
    run_program("tests/c/get_or_load.c");
}

/// The generic engine's C program again under valgrind, when it is
/// installed: `cacheaside_bytes_set` from its own bytes used to read freed
/// memory.
#[test]
fn c_get_or_load_under_valgrind() {
    match valgrind() {
        Some(wrapper) => run_program_under("tests/c/get_or_load.c", &wrapper),
        None => eprintln!("valgrind is not installed: skipped"),
    }
}

#[test]
fn c_patterns_rate_limit_sessions_pubsub() {
    run_program("tests/c/patterns.c");
}

/// The patterns' C program again under valgrind, when it is installed: no
/// invalid read or write, no definite leak, through subscription threads
/// freed from outside and from their own callback.
#[test]
fn c_patterns_under_valgrind() {
    match valgrind() {
        Some(wrapper) => run_program_under("tests/c/patterns.c", &wrapper),
        None => eprintln!("valgrind is not installed: skipped"),
    }
}

#[test]
fn c_write_behind_enqueue_drain_and_a_killed_worker_process() {
    run_program("tests/c/write_behind.c");
}

#[test]
fn cpp_wrapper_raii_optional_and_single_flight() {
    run_program("tests/cpp/client.cpp");
}

#[test]
fn cpp_engine_raii_single_flight_write_through_and_named_errors() {
    run_program("tests/cpp/engine.cpp");
}

#[test]
fn cpp_wrapper_patterns() {
    run_program("tests/cpp/patterns.cpp");
}

#[test]
fn cpp_wrapper_write_behind() {
    run_program("tests/cpp/write_behind.cpp");
}

/// Every program in `tests/c` and `tests/cpp` has a test above.
#[test]
fn every_program_is_run() {
    let listed = [
        "tests/c/users.c",
        "tests/c/near.c",
        "tests/c/bad_input.c",
        "tests/c/get_or_load.c",
        "tests/c/engine.c",
        "tests/c/batch.c",
        "tests/c/deprecated.c",
        "tests/c/outage.c",
        "tests/c/relay.c",
        "tests/c/patterns.c",
        "tests/c/write_behind.c",
        "tests/cpp/client.cpp",
        "tests/cpp/engine.cpp",
        "tests/cpp/patterns.cpp",
        "tests/cpp/write_behind.cpp",
    ];
    for dir in ["tests/c", "tests/cpp"] {
        for entry in std::fs::read_dir(manifest_path(dir)).expect("read test sources") {
            let path = entry.expect("directory entry").path();
            let is_program = path.extension().is_some_and(|e| e == "c" || e == "cpp");
            if is_program {
                let name = format!(
                    "{dir}/{}",
                    path.file_name().and_then(|n| n.to_str()).unwrap_or("")
                );
                assert!(
                    listed.contains(&name.as_str()),
                    "{name} has no #[test] in tests/c_abi.rs"
                );
            }
        }
    }
}

/// The header's version macros are Cargo.toml's version.
#[test]
fn header_version_macros_match_cargo_toml() {
    let header =
        std::fs::read_to_string(manifest_path("include/cacheaside.h")).expect("read the header");
    let define = |name: &str| {
        header
            .lines()
            .find_map(|line| line.strip_prefix(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("{name} is not defined in include/cacheaside.h"))
            .trim()
            .to_owned()
    };
    assert_eq!(
        define("CACHEASIDE_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MAJOR")
    );
    assert_eq!(
        define("CACHEASIDE_VERSION_MINOR"),
        env!("CARGO_PKG_VERSION_MINOR")
    );
    assert_eq!(
        define("CACHEASIDE_VERSION_PATCH"),
        env!("CARGO_PKG_VERSION_PATCH")
    );
    assert_eq!(
        define("CACHEASIDE_VERSION"),
        format!("\"{}\"", env!("CARGO_PKG_VERSION"))
    );
    assert!(header.contains("#ifndef CACHEASIDE_H"), "include guard");
    assert!(header.contains("Do not edit this file"), "generated banner");
}

/// Every `extern "C"` function in `src/ffi/` is declared in the checked-in
/// header, so a header that lags the source fails here too (CI also runs
/// `git diff --exit-code include/` after a build).
#[test]
fn header_declares_every_exported_function() {
    let header =
        std::fs::read_to_string(manifest_path("include/cacheaside.h")).expect("read the header");
    let mut found = 0;
    for entry in std::fs::read_dir(manifest_path("src/ffi")).expect("read src/ffi") {
        let source =
            std::fs::read_to_string(entry.expect("directory entry").path()).expect("read source");
        for line in source.lines() {
            let Some(rest) = line.split("extern \"C\" fn ").nth(1) else {
                continue;
            };
            let Some(name) = rest
                .split('(')
                .next()
                .filter(|n| n.starts_with("cacheaside_"))
            else {
                continue;
            };
            found += 1;
            assert!(
                header.contains(&format!(" {name}(")) || header.contains(&format!("*{name}(")),
                "{name} is missing from include/cacheaside.h: rebuild to regenerate it"
            );
        }
    }
    assert!(found >= 30, "only {found} exported functions found");
}

/// The header's promise about `cacheaside_client_open` matches the code: it
/// opens lazily (`outage.c` opens one against a refused Redis and gets
/// `CACHEASIDE_OK`), so it neither blocks for the pools nor times out, and
/// it points C users at `cacheaside_client_ping` to check the servers.
#[test]
fn header_says_client_open_is_lazy_and_points_at_ping() {
    let header =
        std::fs::read_to_string(manifest_path("include/cacheaside.h")).expect("read the header");
    let declaration = header
        .find("cacheaside_status cacheaside_client_open(")
        .expect("cacheaside_client_open is declared");
    let doc_start = header[..declaration]
        .rfind("/**")
        .expect("a doc comment above it");
    let doc = &header[doc_start..declaration];
    assert!(doc.contains("cacheaside_client_ping"), "{doc}");
    assert!(!doc.contains("CACHEASIDE_TIMEOUT"), "{doc}");
    assert!(!doc.contains("Blocks until"), "{doc}");
}

/// Every `Config` field has a C setter named as the field
/// (`cacheaside_config_set_<field>`, with `_ms` for a duration), and every
/// deprecated old name is marked so in the header.
#[test]
fn header_has_a_setter_named_as_every_config_field() {
    let header =
        std::fs::read_to_string(manifest_path("include/cacheaside.h")).expect("read the header");
    let source =
        std::fs::read_to_string(manifest_path("src/config.rs")).expect("read src/config.rs");
    let start = source.find("pub struct Config {").expect("Config");
    let end = start + source[start..].find("\n}").expect("end of Config");
    let mut missing = Vec::new();
    let mut fields = 0;
    for line in source[start..end].lines() {
        let Some(field) = line.strip_prefix("    pub ") else {
            continue;
        };
        let (name, ty) = field.split_once(':').expect("name: type");
        fields += 1;
        let setter = if ty.contains("Duration") {
            format!("cacheaside_config_set_{name}_ms(")
        } else {
            format!("cacheaside_config_set_{name}(")
        };
        if !header.contains(&setter) {
            missing.push(setter);
        }
    }
    assert!(fields > 30, "only {fields} fields found");
    assert!(missing.is_empty(), "no C setter: {missing:?}");
    for old in [
        "cacheaside_config_set_fail_safe_ms(",
        "cacheaside_config_set_write_behind_retries(",
        "cacheaside_install_schema(",
        "cacheaside_set_log_callback(",
    ] {
        let at = header
            .find(&format!(" {old}"))
            .unwrap_or_else(|| panic!("{old} is kept"));
        let declaration = &header[header[..at].rfind("*/").expect("a doc above")..at];
        assert!(declaration.contains("CACHEASIDE_DEPRECATED("), "{old}");
    }
}

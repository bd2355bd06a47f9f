//! The habits that keep the code easy to change, checked on every test run (ARCHITECTURE.md,
//! "Habits"): no production source file over 800 lines, no `#[allow]` without a reason, and the
//! core crate warns on any public item without documentation (which CI's `clippy -D warnings`
//! turns into a failure).

#![allow(clippy::expect_used, reason = "test code: helpers outside #[test] fns, which allow-expect-in-tests misses")]

use std::fs;
use std::path::{Path, PathBuf};

/// The longest a production source file may be.
const FILE_LINES_MAX: usize = 800;

/// Crates that are test machinery only (dev-dependencies), whose files are tests.
const TEST_CRATES: [&str; 1] = ["tollgate-conformance"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("the workspace root")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("a readable directory").map(|e| e.expect("a directory entry")) {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every Rust file of the crates, and whether it is production code (under a crate's `src`,
/// not a test crate's).
fn files() -> Vec<(PathBuf, bool)> {
    let crates = workspace().join("crates");
    let mut all = Vec::new();
    rust_files(&crates, &mut all);
    all.into_iter()
        .map(|path| {
            let rel = path.strip_prefix(&crates).expect("under crates/").to_path_buf();
            let mut parts = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned());
            let krate = parts.next().unwrap_or_default();
            let production = parts.next().as_deref() == Some("src") && !TEST_CRATES.contains(&krate.as_str());
            (path, production)
        })
        .collect()
}

#[test]
fn no_production_file_is_over_800_lines() {
    let long: Vec<String> = files()
        .into_iter()
        .filter(|(_, production)| *production)
        .filter_map(|(path, _)| {
            let lines = fs::read_to_string(&path).expect("a readable file").lines().count();
            (lines > FILE_LINES_MAX).then(|| format!("{} ({lines} lines)", path.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these files (at most {FILE_LINES_MAX} lines each): {long:#?}");
}

/// The `allow` attributes of a file, whole, with their line numbers: a line that starts (after
/// its indent) with `#[allow(` or `#![allow(`, up to the `)]` that closes it, which may be
/// several lines on.
fn allow_attributes(text: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let start = line.trim_start();
        if start.starts_with("#[allow(") || start.starts_with("#![allow(") {
            let mut attr = String::new();
            for more in &lines[n..] {
                attr.push_str(more.trim());
                if more.contains(")]") {
                    break;
                }
            }
            found.push((n + 1, attr));
        }
    }
    found
}

#[test]
fn every_allow_says_why() {
    let mut bare = Vec::new();
    for (path, _) in files() {
        let text = fs::read_to_string(&path).expect("a readable file");
        for (line, attr) in allow_attributes(&text) {
            if !attr.contains("reason") {
                bare.push(format!("{}:{line}: {attr}", path.display()));
            }
        }
    }
    assert!(bare.is_empty(), "give each of these a `reason = \"…\"`: {bare:#?}");
}

#[test]
fn the_allow_finder_sees_what_it_should() {
    let text =
        "fn a() {}\n#[allow(dead_code)]\nfn b() {}\n#[allow(\n    clippy::x,\n    reason = \"y\"\n)]\nfn c() {}\n";
    let found = allow_attributes(text);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0], (2, "#[allow(dead_code)]".to_string()));
    assert!(found[1].1.contains("reason"), "a reason on a later line counts: {found:?}");
}

#[test]
fn core_warns_on_undocumented_public_items() {
    let lib = fs::read_to_string(workspace().join("crates/tollgate-core/src/lib.rs")).expect("core's lib.rs");
    assert!(
        lib.contains("#![warn(missing_docs)]"),
        "tollgate-core must keep #![warn(missing_docs)]: CI denies its warnings, so every public item stays documented"
    );
}

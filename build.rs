//! Stamps the git commit into `--version` and `workersd_build_info` when built from a
//! checkout; a build from a source archive says the version alone.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    // Rebuilt when HEAD moves: HEAD itself (a branch switch) and the refs (a commit). Only
    // existing paths: a missing one would rerun this on every build.
    let dirs = [
        git(&["rev-parse", "--git-dir"]),
        git(&["rev-parse", "--git-common-dir"]),
    ];
    let watched = [
        dirs[0].as_ref().map(|d| PathBuf::from(d).join("HEAD")),
        dirs[1].as_ref().map(|d| PathBuf::from(d).join("refs")),
        dirs[1]
            .as_ref()
            .map(|d| PathBuf::from(d).join("packed-refs")),
    ];
    for path in watched.into_iter().flatten().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let version = env!("CARGO_PKG_VERSION");
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(commit) => {
            println!("cargo:rustc-env=WORKERSD_VERSION={version} (commit {commit})");
            println!("cargo:rustc-env=WORKERSD_COMMIT={commit}");
        }
        None => {
            println!("cargo:rustc-env=WORKERSD_VERSION={version}");
            println!("cargo:rustc-env=WORKERSD_COMMIT=");
        }
    }
}

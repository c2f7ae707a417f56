//! Records the git commit the binary is built from, for `switchyard version`,
//! `/status` and `switchyard_build_info`. `SWITCHYARD_COMMIT` in the build's
//! environment wins (an image built without `.git`); without either, "unknown".

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=SWITCHYARD_COMMIT");
    // A new commit moves HEAD or the branch it names (loose or packed).
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let commit = std::env::var("SWITCHYARD_COMMIT")
        .ok()
        .filter(|commit| !commit.trim().is_empty())
        .or_else(|| {
            let output = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().ok()?;
            let commit = String::from_utf8(output.stdout).ok()?;
            output.status.success().then(|| commit.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=SWITCHYARD_COMMIT={commit}");
}

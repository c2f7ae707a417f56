//! Records the git commit the binary is built from, for `switchyard version`,
//! `/status` and `switchyard_build_info`. `SWITCHYARD_COMMIT` in the build's
//! environment wins (an image built without `.git`); without either, "unknown".

use std::path::Path;
use std::process::Command;

/// `git rev-parse ARGS`, or `None` outside a git checkout (or without git).
fn rev_parse(args: &[&str]) -> Option<String> {
    let output = Command::new("git").arg("rev-parse").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    output.status.success().then(|| text.trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=SWITCHYARD_COMMIT");
    // A new commit moves HEAD or the branch it names (loose or packed); in a
    // worktree HEAD is the worktree's and the branches are the repository's.
    if let (Some(own), Some(common)) = (rev_parse(&["--git-dir"]), rev_parse(&["--git-common-dir"])) {
        let (own, common) = (Path::new(&own), Path::new(&common));
        for path in [own.join("HEAD"), common.join("refs/heads"), common.join("packed-refs")] {
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    let commit = std::env::var("SWITCHYARD_COMMIT")
        .ok()
        .filter(|commit| !commit.trim().is_empty())
        .or_else(|| rev_parse(&["--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=SWITCHYARD_COMMIT={commit}");
}

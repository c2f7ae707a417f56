//! What this binary is: the crate's version and the git commit it was built
//! from (recorded by `build.rs`), as `switchyard version`, `/status` and
//! `switchyard_build_info` give them.

/// The crate version, e.g. `0.1.0`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit's abbreviated hash, or `unknown` for a build outside git.
pub const COMMIT: &str = env!("SWITCHYARD_COMMIT");
/// `0.1.0 (commit 0123456789ab)`: what `--version` prints after the name.
pub const LONG: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("SWITCHYARD_COMMIT"), ")");

//! Request paths as routes and backends both see them: dot segments removed
//! (RFC 3986 section 5.2.4), `%2e` counted as a dot for that purpose, and
//! optionally runs of slashes merged.
//!
//! Without this, `/public/../admin` and `/public/%2e%2e/admin` match a
//! `/public/` route while the backend resolves them to `/admin`. Only what
//! makes a segment a dot segment is decoded: `%2f` and every other escape
//! stay as the client sent them, so the backend decodes exactly what it would
//! have. A segment that is a dot segment before a `;` (`..;jsessionid=1`) is
//! one too, as Tomcat and Jetty read it. A raw backslash is refused: it is
//! not a URI character (RFC 3986), and Windows backends take it for a `/`.
//! A clean path (the common case) is recognised in one pass and left alone,
//! without an allocation.

/// Why a path cannot be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `..` segments climb above the root (`/a/../../etc`).
    AboveRoot,
    /// A raw `\`.
    Backslash,
}

/// The normalised form of `path` (which starts with `/`), or `None` when it
/// is already normal. `merge_slashes` also turns `//` into `/`.
pub fn normalize(path: &str, merge_slashes: bool) -> Result<Option<String>, PathError> {
    if !path.starts_with('/') || is_normal(path.as_bytes(), merge_slashes) {
        return Ok(None);
    }
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    let mut out = String::with_capacity(path.len());
    // Segments after the leading '/'; each is pushed with its leading '/'.
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match dots(segment) {
            1 => {
                // `/a/.` is `/a/`: the directory itself.
                if last {
                    out.push('/');
                }
            }
            2 => {
                let Some(cut) = out.rfind('/') else { return Err(PathError::AboveRoot) };
                out.truncate(cut);
                if last {
                    out.push('/');
                }
            }
            _ if segment.is_empty() && merge_slashes && !last => {}
            _ => {
                out.push('/');
                out.push_str(segment);
            }
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(Some(out))
}

/// Whether no segment of `path` is a dot segment and (with `merge_slashes`)
/// no two slashes are adjacent: one pass over the bytes.
fn is_normal(path: &[u8], merge_slashes: bool) -> bool {
    // Most paths have no byte that could start a dot segment or be refused:
    // one quick pass says so.
    let unusual_byte = path.iter().any(|&b| matches!(b, b'.' | b'%' | b'\\'));
    let doubled_slash = || path.windows(2).any(|pair| pair == b"//");
    if !(unusual_byte || merge_slashes && doubled_slash()) {
        return true;
    }
    let mut start = 1;
    for end in (1..=path.len()).filter(|&i| i == path.len() || path[i] == b'/') {
        let segment = &path[start..end];
        let unusual = dots_in(segment) != 0 || segment.contains(&b'\\');
        if unusual || (merge_slashes && segment.is_empty() && end < path.len()) {
            return false;
        }
        start = end + 1;
    }
    true
}

/// 1 for `.`, 2 for `..` (either dot possibly written `%2e`, and perhaps
/// followed by `;` and parameters), else 0.
fn dots(segment: &str) -> u8 {
    dots_in(segment.as_bytes())
}

fn dots_in(segment: &[u8]) -> u8 {
    let segment = segment.split(|&b| b == b';').next().unwrap_or(segment);
    // At most two dots of at most three bytes each: anything longer is a name.
    if segment.is_empty() || segment.len() > 6 {
        return 0;
    }
    let mut count = 0;
    let mut rest = segment;
    while !rest.is_empty() {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', b'e' | b'E', tail @ ..] => tail,
            _ => return 0,
        };
        count += 1;
    }
    if count <= 2 {
        count
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(path: &str) -> Result<String, PathError> {
        normalize(path, false).map(|changed| changed.unwrap_or_else(|| path.to_owned()))
    }

    #[test]
    fn dot_segments_are_removed_as_rfc_3986_says() {
        // RFC 3986 section 5.4's examples, as paths.
        assert_eq!(normal("/a/b/c/./../../g"), Ok("/a/g".into()));
        assert_eq!(normal("/a/b/c/."), Ok("/a/b/c/".into()));
        assert_eq!(normal("/a/b/c/./"), Ok("/a/b/c/".into()));
        assert_eq!(normal("/a/b/c/.."), Ok("/a/b/".into()));
        assert_eq!(normal("/a/b/c/../"), Ok("/a/b/".into()));
        assert_eq!(normal("/a/b/c/../g"), Ok("/a/b/g".into()));
        assert_eq!(normal("/public/../admin"), Ok("/admin".into()));
        assert_eq!(normal("/.."), Err(PathError::AboveRoot));
        assert_eq!(normal("/a/../.."), Err(PathError::AboveRoot));
        assert_eq!(normal("/a/../../b"), Err(PathError::AboveRoot));
        assert_eq!(normal("/."), Ok("/".into()));
        assert_eq!(normal("/a/.."), Ok("/".into()));
    }

    #[test]
    fn an_encoded_dot_counts_but_nothing_else_is_decoded() {
        assert_eq!(normal("/public/%2e%2e/admin"), Ok("/admin".into()));
        assert_eq!(normal("/public/.%2E/admin"), Ok("/admin".into()));
        assert_eq!(normal("/public/%2e/x"), Ok("/public/x".into()));
        assert_eq!(normal("/public/..%2fadmin"), Ok("/public/..%2fadmin".into()), "%2f is not a separator");
        assert_eq!(normal("/a%2eb/...x/.../%2e%2e%2e"), Ok("/a%2eb/...x/.../%2e%2e%2e".into()));
        assert_eq!(normal("/%252e%252e/x"), Ok("/%252e%252e/x".into()), "double encoding stays");
    }

    #[test]
    fn path_parameters_do_not_hide_a_dot_segment_and_a_backslash_is_refused() {
        assert_eq!(normal("/public/..;/admin"), Ok("/admin".into()));
        assert_eq!(normal("/public/..;jsessionid=1/admin"), Ok("/admin".into()));
        assert_eq!(normal("/public/.;x/a"), Ok("/public/a".into()));
        assert_eq!(normal("/a;b/c;d=1"), Ok("/a;b/c;d=1".into()), "other parameters stay");
        assert_eq!(normal("/public\\..\\admin"), Err(PathError::Backslash));
        assert_eq!(normal("/public/%5c..%5cadmin"), Ok("/public/%5c..%5cadmin".into()), "an escape stays an escape");
    }

    #[test]
    fn a_clean_path_is_left_alone() {
        for path in ["/", "/robot/run", "/a/b/", "/a//b", "/.well-known/x", "/a/..b/c.", "*"] {
            assert_eq!(normalize(path, false), Ok(None), "{path}");
        }
    }

    #[test]
    fn slashes_merge_only_when_asked() {
        assert_eq!(normalize("/a//b///c", true), Ok(Some("/a/b/c".into())));
        assert_eq!(normalize("//a", true), Ok(Some("/a".into())));
        assert_eq!(normalize("/a//", true), Ok(Some("/a/".into())));
        assert_eq!(normalize("/a/b", true), Ok(None));
        assert_eq!(normalize("/a//../b", false), Ok(Some("/a/b".into())));
    }
}

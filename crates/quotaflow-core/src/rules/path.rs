//! Canonical request paths. A limit on `POST /login` must not be skipped
//! by asking for `//login`, `/login/`, `/./login`, `/x/../login`,
//! `/%6Cogin`, `/LOGIN`, `/login;jsessionid=1` or
//! `http://host/login`, all of which a backend may serve as `/login`.
//! Paths are therefore brought to one form before they are matched or
//! keyed, on the sync path and in the stream alike:
//!
//! 1. an absolute-form URI (`scheme://authority/path`) keeps only its path;
//! 2. the query (`?…`) and fragment (`#…`) go;
//! 3. each segment loses its parameters (`;…`);
//! 4. percent-encoded unreserved characters (letters, digits, `-._~`) are
//!    decoded; other escapes stay, in upper-case hex (`%2F` stays an
//!    escape, so it never makes a new segment);
//! 5. empty and `.` segments go, `..` removes the segment before it (never
//!    above the root);
//! 6. no trailing slash (but `/` itself);
//! 7. letters are lower-cased unless the config says paths are
//!    case-sensitive (`path_case_sensitive`).
//!
//! Configured paths (`match.path`, `path_prefix`, `path_pattern`) go
//! through the same rules when the config is compiled.

use std::borrow::Cow;

/// `raw` in canonical form; borrowed when it already is.
pub fn canonical_path(raw: &str, case_sensitive: bool) -> Cow<'_, str> {
    if is_canonical(raw, case_sensitive) {
        return Cow::Borrowed(raw);
    }
    let mut path = strip_scheme_and_authority(raw);
    path = path.split(['?', '#']).next().unwrap_or_default();
    let mut segments: Vec<String> = Vec::new();
    for segment in path.split('/') {
        let segment = segment.split(';').next().unwrap_or_default();
        let mut segment = decode_unreserved(segment);
        if !case_sensitive {
            segment.make_ascii_lowercase();
        }
        match segment.as_str() {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    Cow::Owned(format!("/{}", segments.join("/")))
}

/// Whether [`canonical_path`] would return `path` as it is: the common
/// case, checked without allocating.
fn is_canonical(path: &str, case_sensitive: bool) -> bool {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return false;
    }
    if path.len() > 1 && path.ends_with('/') {
        return false;
    }
    if bytes.iter().any(|&b| {
        matches!(b, b'?' | b'#' | b';' | b'%') || (!case_sensitive && b.is_ascii_uppercase())
    }) {
        return false;
    }
    path.len() == 1 || path[1..].split('/').all(|s| !matches!(s, "" | "." | ".."))
}

/// `http://host:8080/x` → `/x`; anything without a scheme is left alone.
fn strip_scheme_and_authority(raw: &str) -> &str {
    let Some((scheme, rest)) = raw.split_once("://") else {
        return raw;
    };
    let is_scheme = !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !is_scheme {
        return raw;
    }
    rest.find('/').map_or("/", |i| &rest[i..])
}

/// Decode `%XX` escapes of unreserved characters; keep others (hex in
/// upper case) and stray `%` as they are.
fn decode_unreserved(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = String::with_capacity(segment.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| segment.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(b) if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => {
                out.push(char::from(b));
                i += 3;
            }
            Some(b) => {
                out.push_str(&format!("%{b:02X}"));
                i += 3;
            }
            None => {
                // Copy one whole UTF-8 character.
                let ch = segment[i..].chars().next().unwrap_or('\u{fffd}');
                out.push(ch);
                i += ch.len_utf8().max(1);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_spelling_of_login_is_login() {
        for raw in [
            "/login",
            "//login",
            "/login/",
            "/./login",
            "/x/../login",
            "/x/%2E%2E/login",
            "/%6Cogin",
            "/%6cogin",
            "/LOGIN",
            "/Login/",
            "/login;jsessionid=1",
            "/login?next=/home",
            "/login#top",
            "http://evil.example/login",
            "HTTPS://evil.example:8443//login/?x",
            "/../../login",
            "login",
        ] {
            assert_eq!(canonical_path(raw, false), "/login", "{raw}");
        }
    }

    #[test]
    fn case_is_kept_when_paths_are_case_sensitive() {
        assert_eq!(canonical_path("/Login/", true), "/Login");
        assert_eq!(canonical_path("/a%2fb", true), "/a%2Fb");
        assert_eq!(canonical_path("/a%2fb", false), "/a%2fb");
    }

    #[test]
    fn encoded_slashes_and_odd_escapes_stay_inside_their_segment() {
        assert_eq!(canonical_path("/a%2F..%2Fb", true), "/a%2F..%2Fb");
        assert_eq!(canonical_path("/100%", true), "/100%");
        assert_eq!(canonical_path("/%zz", true), "/%zz");
        assert_eq!(canonical_path("/caf%C3%A9", true), "/caf%C3%A9");
        assert_eq!(canonical_path("/café/", true), "/café");
        assert_eq!(canonical_path("", true), "/");
        assert_eq!(canonical_path("/", true), "/");
    }

    #[test]
    fn canonical_paths_are_borrowed() {
        assert!(matches!(
            canonical_path("/v1/orders/42", false),
            Cow::Borrowed(_)
        ));
        assert!(matches!(canonical_path("/", false), Cow::Borrowed(_)));
        assert!(matches!(canonical_path("/V1", true), Cow::Borrowed(_)));
        assert!(matches!(canonical_path("/V1", false), Cow::Owned(_)));
    }

    proptest! {
        #[test]
        fn canonical_form_is_a_fixed_point(raw in "[a-zA-Z0-9/%;.?#:~_-]{0,40}", case in any::<bool>()) {
            let once = canonical_path(&raw, case).into_owned();
            let twice = canonical_path(&once, case);
            prop_assert_eq!(&once, &twice);
            // Escapes are always re-checked (the fast test does not parse them).
            prop_assert!(once.contains('%') || is_canonical(&once, case), "{} is not canonical", once);
        }
    }
}

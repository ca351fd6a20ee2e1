//! The `redirectUrl` allowlist (`offramp.redirect_url_allowlist`, used by both routes).
//!
//! Entry formats are the CDP portal's "Domain Allowlist" formats, made exact:
//!
//! - `https://app.com` (or `http://…`, with an optional port): the *origin* — scheme, host
//!   and effective port all equal — and every path under it. `https://app.com` does not
//!   match `http://app.com`, `https://app.com:8443`, `https://app.com.evil.net`,
//!   `https://evil.com/https://app.com` or `https://sub.app.com`.
//!   An entry may carry a path (`https://app.com/wallet`); it then matches that path and
//!   everything below it on a segment boundary (`/wallet`, `/wallet/`, `/wallet/done`, not
//!   `/walletx`). A trailing slash in the entry is ignored.
//! - `https://*.app.com` (`http://` or `https://` only): exactly **one** extra leading
//!   label (`a.app.com`, not `a.b.app.com`, and not `app.com` itself — list it too if
//!   wanted). One level is the rule of TLS wildcard certificates (RFC 6125) and keeps a
//!   forgotten deep subdomain from inheriting trust. The parent must have at least two
//!   labels (`https://*.com` is refused); public-suffix entries like `*.co.uk` are not
//!   detected, so do not write them.
//! - `myapp://path` (custom schemes, for app deep links; no wildcard): the URL, normalised by
//!   the `url` crate, must equal the normalised entry or continue it with `/`, `?` or `#`
//!   (`myapp://path`, `myapp://path/done?x=1`; not `myapp://pathx`). An entry ending in
//!   `/`, such as `myapp://`, matches everything after it.
//!
//! Hosts are compared after the `url` crate's WHATWG normalisation: lowercase, IDNA to
//! punycode, IPv4/IPv6 canonical form, so `HTTPS://App.COM` and `https://bücher.example`
//! match their canonical entries while homographs (Cyrillic `а`) do not. A trailing dot is
//! a different host to a browser (`app.com.` is its own origin), so it never matches, and an
//! entry with one is refused. `http(s)` host names must be letters, digits, `-`, `_` and dots
//! after IDNA (WHATWG would also accept `*`, `&`, `!`… and decode `%2a` to `*`).
//! URLs with user info (`https://app.com@evil.net`, `https://user:pw@app.com`) are
//! refused outright, as are `javascript:`, `data:` and the
//! other script/local-content schemes in [`DENIED_SCHEMES`], even if an entry names them.
//! Spaces and control characters are refused rather than silently stripped (WHATWG parsers
//! drop tabs and newlines, which hides tricks). The gateway forwards the *normalised* URL,
//! so Coinbase sees exactly what was matched.
//!
//! An empty allowlist accepts no `redirectUrl` at all. Offramp requires one, so offramp
//! cannot work until the allowlist is configured.

use std::fmt;

use url::{Host, Url};

/// Longest `redirectUrl` (and allowlist entry) accepted, in bytes.
pub const MAX_URL_LEN: usize = 2048;

/// Schemes that run script or expose local content in a browser; never allowed.
pub const DENIED_SCHEMES: &[&str] = &[
    "javascript",
    "vbscript",
    "data",
    "file",
    "blob",
    "about",
    "filesystem",
    "view-source",
];

/// Label substituted for `*` so the `url` crate can normalise a wildcard entry's parent
/// domain (IDNA, case) exactly as it normalises the URLs it is compared with.
const WILDCARD_PROBE: &str = "x";

/// One parsed allowlist entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectRule {
    entry: String,
    kind: RuleKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum RuleKind {
    Origin {
        scheme: String,
        host: Host<String>,
        port: u16,
        path: String,
    },
    Subdomain {
        scheme: String,
        /// Normalised parent domain, e.g. `app.com` for `https://*.app.com`.
        parent: String,
        port: u16,
        path: String,
    },
    Custom {
        /// Normalised entry, matched as a prefix on a boundary.
        prefix: String,
    },
}

impl RedirectRule {
    /// Parses one allowlist entry. The error says what is wrong with it, for a config
    /// message that also names the key.
    pub fn parse(entry: &str) -> Result<Self, String> {
        if entry.is_empty() {
            return Err("empty entry".into());
        }
        if entry.len() > MAX_URL_LEN {
            return Err(format!("longer than {MAX_URL_LEN} characters"));
        }
        if has_space_or_control(entry) || entry.contains('\\') {
            return Err("contains spaces, control characters or backslashes".into());
        }
        let Some((scheme, rest)) = entry.split_once("://") else {
            return Err("must look like https://app.com, https://*.app.com or myapp://path".into());
        };
        if !is_scheme(scheme) {
            return Err("invalid scheme".into());
        }
        let scheme = scheme.to_ascii_lowercase();
        let kind = match scheme.as_str() {
            s if is_web(s) => parse_web(&scheme, rest)?,
            _ => parse_custom(&scheme, entry)?,
        };
        Ok(RedirectRule {
            entry: entry.to_owned(),
            kind,
        })
    }

    /// Whether `url` is allowed by this entry (see the module docs for the exact rules).
    pub fn matches(&self, url: &Url) -> bool {
        if !url.username().is_empty() || url.password().is_some() {
            return false;
        }
        match &self.kind {
            RuleKind::Origin {
                scheme,
                host,
                port,
                path,
            } => {
                url.scheme() == scheme
                    && url.host().map(|h| h.to_owned()).as_ref() == Some(host)
                    && url.port_or_known_default() == Some(*port)
                    && path_matches(path, url.path())
            }
            RuleKind::Subdomain {
                scheme,
                parent,
                port,
                path,
            } => {
                url.scheme() == scheme
                    && matches!(url.host(), Some(Host::Domain(d)) if is_one_label_under(d, parent))
                    && url.port_or_known_default() == Some(*port)
                    && path_matches(path, url.path())
            }
            RuleKind::Custom { prefix } => {
                url.as_str()
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| {
                        rest.is_empty()
                            || prefix.ends_with('/')
                            || rest.starts_with(['/', '?', '#'])
                    })
            }
        }
    }

    /// The entry as written in the config.
    pub fn as_str(&self) -> &str {
        &self.entry
    }
}

impl fmt::Display for RedirectRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.entry)
    }
}

/// Validates a client-supplied `redirectUrl` against the allowlist. Returns the
/// normalised URL to forward, or the reason for a 400.
pub fn check_redirect_url(raw: &str, allowlist: &[RedirectRule]) -> Result<String, String> {
    if raw.len() > MAX_URL_LEN {
        return Err(format!("longer than {MAX_URL_LEN} characters"));
    }
    if has_space_or_control(raw) {
        return Err("must not contain spaces or control characters".into());
    }
    let url = Url::parse(raw).map_err(|_| "not an absolute URL".to_owned())?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain user info (user@host)".into());
    }
    if DENIED_SCHEMES.contains(&url.scheme()) {
        return Err("scheme not allowed".into());
    }
    if let Some(Host::Domain(d)) = url.host() {
        if is_web(url.scheme()) && !is_ldh_host(d) {
            return Err("host name has characters a DNS name cannot have".into());
        }
    }
    if allowlist.is_empty() {
        return Err(
            "not allowed: offramp.redirect_url_allowlist is empty, so no redirectUrl is accepted"
                .into(),
        );
    }
    if allowlist.iter().any(|rule| rule.matches(&url)) {
        Ok(url.into())
    } else {
        Err("not in offramp.redirect_url_allowlist".into())
    }
}

fn parse_web(scheme: &str, rest: &str) -> Result<RuleKind, String> {
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if rest[..authority_end].contains('@') {
        return Err("must not contain user info (user@host)".into());
    }
    let (wildcard, to_parse) = match rest.strip_prefix("*.") {
        Some(after) => (true, format!("{scheme}://{WILDCARD_PROBE}.{after}")),
        None => (false, format!("{scheme}://{rest}")),
    };
    // The url crate accepts '*' inside host names, so it must be policed here.
    if to_parse.contains('*') {
        return Err("'*' is only allowed as the whole first label, as in https://*.app.com".into());
    }
    let url = Url::parse(&to_parse).map_err(|e| format!("not a valid URL: {e}"))?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    let (Some(host), Some(port)) = (url.host(), url.port_or_known_default()) else {
        return Err("has no host".into());
    };
    let path = url.path().trim_end_matches('/').to_owned();
    let host = host.to_owned();
    if let Host::Domain(d) = &host {
        if d.ends_with('.') {
            return Err("must not end with a dot".into());
        }
        if !is_ldh_host(d) {
            return Err("host name has characters a DNS name cannot have".into());
        }
    }
    if !wildcard {
        return Ok(RuleKind::Origin {
            scheme: scheme.to_owned(),
            host,
            port,
            path,
        });
    }
    let parent = match &host {
        Host::Domain(d) => d
            .strip_prefix(WILDCARD_PROBE)
            .and_then(|p| p.strip_prefix('.')),
        _ => None,
    };
    match parent {
        Some(p) if p.contains('.') && !p.starts_with('.') => Ok(RuleKind::Subdomain {
            scheme: scheme.to_owned(),
            parent: p.to_owned(),
            port,
            path,
        }),
        _ => {
            Err("a wildcard needs a domain of at least two labels, as in https://*.app.com".into())
        }
    }
}

fn parse_custom(scheme: &str, entry: &str) -> Result<RuleKind, String> {
    if DENIED_SCHEMES.contains(&scheme) {
        return Err("scheme not allowed".into());
    }
    if entry.contains('*') {
        return Err("wildcards are only allowed in http:// and https:// entries".into());
    }
    let url = Url::parse(entry).map_err(|e| format!("not a valid URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain user info (user@host)".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    Ok(RuleKind::Custom { prefix: url.into() })
}

/// `path` is the entry's path without trailing slashes; empty means "all paths".
fn path_matches(prefix: &str, path: &str) -> bool {
    prefix.is_empty()
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// `host` is exactly one non-empty label followed by `.parent`.
fn is_one_label_under(host: &str, parent: &str) -> bool {
    host.strip_suffix(parent)
        .and_then(|h| h.strip_suffix('.'))
        .is_some_and(|label| !label.is_empty() && !label.contains('.'))
}

fn is_web(scheme: &str) -> bool {
    matches!(scheme, "http" | "https")
}

/// Letters, digits, `-`, `_` and dots: what a resolvable name (after IDNA) consists of.
/// The WHATWG parser also lets through `*`, `&`, `!`, `$` and friends (`%2a` decodes to a
/// `*` host), which must never satisfy a wildcard label.
fn is_ldh_host(host: &str) -> bool {
    host.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn has_space_or_control(s: &str) -> bool {
    s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// RFC 3986: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
fn is_scheme(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> RedirectRule {
        RedirectRule::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn allowed(entry: &str, url: &str) -> bool {
        check_redirect_url(url, &[rule(entry)]).is_ok()
    }

    #[test]
    fn exact_origin() {
        let e = "https://app.com";
        assert!(allowed(e, "https://app.com"));
        assert!(allowed(e, "https://app.com/"));
        assert!(allowed(e, "https://app.com/a/b?c=d#e"));
        assert!(allowed(e, "https://app.com:443/x"));
        assert!(allowed(e, "HTTPS://APP.COM/x"));
        assert!(!allowed(e, "http://app.com"));
        assert!(!allowed(e, "https://app.com:8443"));
        assert!(!allowed(e, "https://app.com.evil.net"));
        assert!(!allowed(e, "https://app.com.evil.net/"));
        assert!(!allowed(e, "https://evilapp.com"));
        assert!(!allowed(e, "https://sub.app.com"));
        assert!(!allowed(e, "https://evil.com/https://app.com"));
        assert!(!allowed(e, "https://evil.com?https://app.com"));
        assert!(!allowed(e, "https://evil.com#https://app.com"));
        assert!(!allowed(e, "https://app.com@evil.net"));
        assert!(!allowed(e, "https://app.com:443@evil.net"));
        assert!(!allowed(e, "https://user:pw@app.com/"));
        assert!(!allowed(e, "https://user@app.com/"));
        assert!(!allowed(e, "//app.com"));
        assert!(!allowed(e, "/path"));
        assert!(!allowed(e, "app.com"));
        assert!(!allowed(e, "wss://app.com"));
    }

    #[test]
    fn trailing_dots() {
        assert!(!allowed("https://app.com", "https://app.com./"));
        assert!(!allowed("https://app.com", "https://app.com../"));
        assert!(RedirectRule::parse("https://app.com.").is_err());
        assert!(RedirectRule::parse("https://*.app.com.").is_err());
        assert!(!allowed("https://*.app.com", "https://a.app.com./"));
    }

    #[test]
    fn backslash_and_whitespace_tricks() {
        // WHATWG treats '\' as '/' in special URLs: the host is app.com, and the
        // normalised form is what gets forwarded.
        assert_eq!(
            check_redirect_url("https://app.com\\@evil.net", &[rule("https://app.com")]),
            Ok("https://app.com/@evil.net".to_owned())
        );
        assert!(!allowed("https://app.com", "https://evil.net\\@app.com"));
        assert!(!allowed("https://app.com", "https://app.com\t/"));
        assert!(!allowed("https://app.com", "https://app.com\n/"));
        assert!(!allowed("https://app.com", " https://app.com/"));
        assert!(!allowed("https://app.com", "https://app.com/\u{0}"));
        assert!(!allowed("https://app.com", "https://app.com/\u{a0}"));
        assert!(!allowed("https://app.com", "https://app .com/"));
    }

    #[test]
    fn ports() {
        let e = "http://localhost:3000";
        assert!(allowed(e, "http://localhost:3000/done"));
        assert!(!allowed(e, "http://localhost/done"));
        assert!(!allowed(e, "http://localhost:3001/done"));
        assert!(!allowed(e, "https://localhost:3000/done"));
        assert!(allowed("https://app.com:443", "https://app.com/"));
        assert!(allowed("https://app.com:8443", "https://app.com:8443/"));
        assert!(!allowed("https://app.com:8443", "https://app.com/"));
        assert!(allowed("http://app.com", "http://app.com:80/"));
    }

    #[test]
    fn ip_hosts() {
        assert!(allowed("http://127.0.0.1:8080", "http://127.0.0.1:8080/x"));
        // 0x7f.1 is 127.0.0.1 for the WHATWG parser: same host, normalised.
        assert!(allowed("http://127.0.0.1:8080", "http://0x7f.1:8080/x"));
        assert!(!allowed("http://127.0.0.1:8080", "http://127.0.0.2:8080/x"));
        assert!(allowed("http://[::1]:8080", "http://[0:0::1]:8080/"));
        assert!(RedirectRule::parse("https://*.127.0.0.1").is_err());
    }

    #[test]
    fn idn_and_case() {
        let e = "https://bücher.example";
        assert!(allowed(e, "https://BÜCHER.example/x"));
        assert!(allowed(e, "https://xn--bcher-kva.example/x"));
        assert!(allowed(
            "https://xn--bcher-kva.example",
            "https://bücher.example/"
        ));
        assert!(allowed("HTTPS://App.COM", "https://app.com/"));
        // Cyrillic 'а' (U+0430) is a different host.
        assert!(!allowed("https://app.com", "https://\u{430}pp.com/"));
        // Fullwidth letters are mapped by IDNA to ASCII, so the browser goes to app.com.
        assert!(allowed("https://app.com", "https://\u{ff41}pp.com/"));
        // Percent-encoded host bytes decode to the same host.
        assert!(allowed("https://app.com", "https://app%2ecom/"));
    }

    #[test]
    fn odd_host_characters() {
        for url in [
            "https://%2a.app.com/",
            "https://a&b.app.com/",
            "https://a!b.app.com/",
            "https://a$b.app.com/",
            "https://a'b.app.com/",
            "https://a(b).app.com/",
            "https://a,b.app.com/",
            "https://a;b.app.com/",
            "https://a=b.app.com/",
            "https://a+b.app.com/",
            "https://a~b.app.com/",
        ] {
            assert!(!allowed("https://*.app.com", url), "{url}");
        }
        assert!(RedirectRule::parse("https://%2a.app.com").is_err());
        assert!(RedirectRule::parse("https://a&b.app.com").is_err());
        assert!(allowed("https://*.app.com", "https://my_host-1.app.com/"));
    }

    #[test]
    fn entry_paths() {
        let e = "https://app.com/wallet/";
        assert!(allowed(e, "https://app.com/wallet"));
        assert!(allowed(e, "https://app.com/wallet/"));
        assert!(allowed(e, "https://app.com/wallet/done?x=1"));
        assert!(!allowed(e, "https://app.com/walletx"));
        assert!(!allowed(e, "https://app.com/"));
        assert!(!allowed(e, "https://app.com/other/wallet"));
        // Dot segments are resolved before matching.
        assert!(!allowed(e, "https://app.com/wallet/../admin"));
        assert!(!allowed(e, "https://app.com/wallet/%2e%2e/admin"));
    }

    #[test]
    fn wildcards() {
        let e = "https://*.app.com";
        assert!(allowed(e, "https://a.app.com/"));
        assert!(allowed(e, "https://WWW.App.Com/x"));
        assert!(!allowed(e, "https://app.com/"));
        assert!(!allowed(e, "https://a.b.app.com/"));
        assert!(!allowed(e, "https://evilapp.com/"));
        assert!(!allowed(e, "https://a.app.com.evil.net/"));
        assert!(!allowed(e, "http://a.app.com/"));
        assert!(!allowed(e, "https://a.app.com:8443/"));
        assert!(!allowed(e, "https://x@a.app.com/"));
        assert!(allowed("http://*.app.com", "http://a.app.com/"));
        assert!(allowed("https://*.app.com:8443", "https://a.app.com:8443/"));
        assert!(allowed(
            "https://*.bücher.example",
            "https://a.xn--bcher-kva.example/"
        ));
        // The probe label must not leak into matching: "x.app.com" is just one subdomain.
        assert!(allowed(e, "https://x.app.com/"));
        assert!(allowed("https://*.x.app.com", "https://a.x.app.com/"));
        assert!(!allowed("https://*.x.app.com", "https://x.app.com/"));
    }

    #[test]
    fn bad_entries() {
        for bad in [
            "",
            "app.com",
            "https://",
            "https://*.com",
            "https://*",
            "https://*.",
            "https://*app.com",
            "https://a.*.app.com",
            "https://app.*",
            "https://ap*p.com",
            "https://**.app.com",
            "myapp://*",
            "myapp://*.path",
            "https://user@app.com",
            "https://app.com?x=1",
            "https://app.com#x",
            "javascript://alert(1)",
            "data://text/html,x",
            "file:///etc",
            "https://app.com /",
            "https://app.com\\x",
            "1ab://x",
            "://x",
            "*://app.com",
        ] {
            assert!(
                RedirectRule::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
        assert!(RedirectRule::parse(&format!("https://app.com/{}", "a".repeat(3000))).is_err());
    }

    #[test]
    fn custom_schemes() {
        let e = "myapp://path";
        assert!(allowed(e, "myapp://path"));
        assert!(allowed(e, "MyApp://path"));
        assert!(allowed(e, "myapp://path/done"));
        assert!(allowed(e, "myapp://path?x=1"));
        assert!(allowed(e, "myapp://path#x"));
        assert!(!allowed(e, "myapp://pathx"));
        assert!(!allowed(e, "myapp://path.evil"));
        assert!(!allowed(e, "myapp://path:1"));
        assert!(!allowed(e, "myapp://other"));
        assert!(!allowed(e, "myapp:path"));
        assert!(!allowed(e, "myapp://x@path"));
        assert!(!allowed(e, "otherapp://path"));
        assert!(!allowed(e, "https://path"));
        assert!(allowed("myapp://", "myapp://anything/at?all"));
        assert!(allowed("myapp://cb/", "myapp://cb/x"));
        assert!(!allowed("myapp://cb/", "myapp://cbx"));
        assert!(!allowed("myapp://cb/", "myapp://cb"));
    }

    #[test]
    fn denied_schemes() {
        for url in [
            "javascript:alert(1)",
            "JaVaScRiPt:alert(1)",
            "javascript://app.com/%0aalert(1)",
            "data:text/html,<script>alert(1)</script>",
            "vbscript:msgbox",
            "file:///etc/passwd",
            "blob:https://app.com/uuid",
            "about:blank",
        ] {
            let err = check_redirect_url(url, &[rule("https://app.com"), rule("myapp://")]);
            assert!(err.is_err(), "{url}");
        }
    }

    #[test]
    fn empty_allowlist_refuses_everything() {
        let err = check_redirect_url("https://app.com/", &[]).unwrap_err();
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn long_urls() {
        let long = format!("https://app.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(!allowed("https://app.com", &long));
        let fits = format!("https://app.com/{}", "a".repeat(MAX_URL_LEN - 16));
        assert_eq!(fits.len(), MAX_URL_LEN);
        assert!(allowed("https://app.com", &fits));
    }

    #[test]
    fn forwards_normalised_url() {
        let rules = [rule("https://app.com")];
        assert_eq!(
            check_redirect_url("HTTPS://APP.COM:443/a/./b/../c?x=1#f", &rules),
            Ok("https://app.com/a/c?x=1#f".to_owned())
        );
    }

    #[test]
    fn display_is_the_entry() {
        assert_eq!(rule("https://*.App.com").to_string(), "https://*.App.com");
        assert_eq!(rule("https://*.App.com").as_str(), "https://*.App.com");
    }
}

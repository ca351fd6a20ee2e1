//! `redirectUrl` allowlist matching (src/onramp/redirect.rs).
//!
//! Input: `<allowlist entry>\n<url>`. The URL is checked against that one entry (when it
//! parses) and against a fixed allowlist whose hosts are known here, so "accepted" can be
//! compared with an independent statement of what the entry allows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onramp_gateway::onramp::redirect::{check_redirect_url, RedirectRule, DENIED_SCHEMES};
use url::{Host, Url};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (entry, raw) = text.split_once('\n').unwrap_or(("", text));
    fixed_allowlist(raw);
    if let Ok(rule) = RedirectRule::parse(entry) {
        fuzzed_entry(entry, &rule, raw);
    }
});

/// The invariants every accepted URL has, whatever the allowlist.
fn accepted(raw: &str, normalised: &str, allowlist: &[RedirectRule]) -> Url {
    assert!(
        !normalised
            .chars()
            .any(|c| c.is_whitespace() || c.is_control()),
        "{normalised:?}"
    );
    let url = Url::parse(normalised).expect("forwarded URL does not parse");
    assert!(
        url.username().is_empty() && url.password().is_none(),
        "{raw:?}"
    );
    assert!(!DENIED_SCHEMES.contains(&url.scheme()), "{raw:?}");
    // Coinbase parses what is forwarded: it must be accepted again as itself, or the
    // browser would end up somewhere other than what was matched.
    assert_eq!(
        check_redirect_url(normalised, allowlist).as_deref(),
        Ok(normalised),
        "normalisation is not stable for {raw:?}"
    );
    assert!(allowlist.iter().any(|r| r.matches(&url)));
    url
}

fn fixed_allowlist(raw: &str) {
    let allowlist: Vec<RedirectRule> = [
        "https://app.example/wallet",
        "https://*.wallet.example",
        "myapp://done",
    ]
    .iter()
    .map(|e| RedirectRule::parse(e).unwrap())
    .collect();
    let Ok(normalised) = check_redirect_url(raw, &allowlist) else {
        return;
    };
    let url = accepted(raw, &normalised, &allowlist);
    match url.scheme() {
        "https" => {
            assert_eq!(url.port_or_known_default(), Some(443), "{raw:?}");
            match url.host() {
                Some(Host::Domain("app.example")) => {
                    let p = url.path();
                    assert!(p == "/wallet" || p.starts_with("/wallet/"), "{raw:?}");
                }
                Some(Host::Domain(d)) => {
                    let label = d.strip_suffix(".wallet.example").expect(raw);
                    assert!(!label.is_empty() && !label.contains('.'), "{raw:?}");
                    assert!(
                        label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                        "{raw:?}"
                    );
                }
                other => panic!("host {other:?} accepted for {raw:?}"),
            }
        }
        "myapp" => {
            let rest = normalised.strip_prefix("myapp://done").expect(raw);
            assert!(
                rest.is_empty() || rest.starts_with(['/', '?', '#']),
                "{raw:?}"
            );
        }
        s => panic!("scheme {s} accepted for {raw:?}"),
    }
}

fn fuzzed_entry(entry: &str, rule: &RedirectRule, raw: &str) {
    let allowlist = [rule.clone()];
    let Ok(normalised) = check_redirect_url(raw, &allowlist) else {
        return;
    };
    let url = accepted(raw, &normalised, &allowlist);
    let lower = entry.to_ascii_lowercase();
    if let Some(after) = lower
        .strip_prefix("https://*.")
        .or_else(|| lower.strip_prefix("http://*."))
    {
        // Wildcard: one extra label in front of the entry's (normalised) parent.
        let probe = Url::parse(&format!("{}://x.{after}", url.scheme())).unwrap();
        let parent = probe.host_str().unwrap().strip_prefix("x.").unwrap();
        let host = url.host_str().unwrap();
        let label = host.strip_suffix(parent).and_then(|h| h.strip_suffix('.'));
        assert!(
            label.is_some_and(|l| !l.is_empty() && !l.contains('.')),
            "{host} accepted for {entry:?}"
        );
    } else if lower.starts_with("https://") || lower.starts_with("http://") {
        // Origin: exactly the entry's scheme, host and port.
        let e = Url::parse(entry).unwrap();
        assert_eq!(url.scheme(), e.scheme(), "{raw:?} for {entry:?}");
        assert_eq!(url.host(), e.host(), "{raw:?} for {entry:?}");
        assert_eq!(url.port_or_known_default(), e.port_or_known_default());
    } else {
        let prefix: String = Url::parse(entry).unwrap().into();
        assert!(normalised.starts_with(&prefix), "{raw:?} for {entry:?}");
    }
}

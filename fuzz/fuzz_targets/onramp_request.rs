//! Browser input → validated request → `Location` (src/onramp/request.rs `from_query`,
//! `from_form`, `from_json`, `build_location`).
//!
//! Input: byte 0 picks the parser (`q` query, `f` form, `j` JSON, `u` the app's context
//! JSON for `addresses.source = "upstream"`, a newline, then the client's query; others by
//! value), byte 1
//! the rules (bit 0: offramp, bit 1: `onramp.assets` configured), an optional `\n`, then
//! the query string or body. Seeds are readable: `q\`\naddress=0x..&blockchains=base`.
//!
//! Invariants on every Location built from an accepted request (SPEC: the Location never
//! carries the address, a parameter outside the allowed set, a CR/LF, or a redirect host
//! outside the allowlist):
//! - no CR, LF, other control characters or spaces;
//! - same origin and path as the configured base;
//! - its query is exactly `sessionToken` followed by the validated presets, each name in
//!   `preset_names(flow)` and at most once;
//! - the address appears nowhere unless the client also sent it as a preset value;
//! - `redirectUrl`, if present, matches the allowlist and its host is one of the allowlist's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use onramp_gateway::onramp::request::{
    build_location, from_form, from_json, from_query, from_upstream_context, preset_names,
    ClientInput, Flow, MintRequest, RedirectRule, Rules,
};
use url::{Host, Url};

const TOKEN: &str = "ZmFrZS10b2tlbg==";

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (mode, flags) = (data[0], data[1]);
    let body = data[2..].strip_prefix(b"\n").unwrap_or(&data[2..]);
    let flow = if flags & 1 == 1 {
        Flow::Offramp
    } else {
        Flow::Onramp
    };
    let blockchains: Vec<String> = ["base", "ethereum", "solana", "bitcoin", "polygon"]
        .map(String::from)
        .to_vec();
    let assets: Vec<String> = if flags & 2 == 2 {
        vec!["USDC".into(), "ETH".into()]
    } else {
        Vec::new()
    };
    let allowlist: Vec<RedirectRule> = ["https://app.example/done", "https://*.wallet.example"]
        .iter()
        .map(|e| RedirectRule::parse(e).unwrap())
        .collect();
    let rules = Rules {
        flow,
        blockchains: &blockchains,
        assets: &assets,
        redirect_allowlist: &allowlist,
    };
    let result = match mode {
        b'q' => std::str::from_utf8(body).map_or(Ok(None), |q| from_query(q, &rules).map(Some)),
        b'f' => from_form(body, &rules).map(Some),
        b'j' => from_json(body, &rules).map(Some),
        b'u' => {
            let at = body.iter().position(|&b| b == b'\n').unwrap_or(body.len());
            let (context, query) = (&body[..at], body.get(at + 1..).unwrap_or_default());
            match std::str::from_utf8(query) {
                Ok(q) => from_upstream_context(context, ClientInput::Query(q), &rules).map(Some),
                Err(_) => Ok(None),
            }
        }
        m => match m % 3 {
            0 => std::str::from_utf8(body).map_or(Ok(None), |q| from_query(q, &rules).map(Some)),
            1 => from_form(body, &rules).map(Some),
            _ => from_json(body, &rules).map(Some),
        },
    };
    let Ok(Some(req)) = result else {
        return;
    };
    check_location(&req, flow, body, &rules);
});

fn check_location(req: &MintRequest, flow: Flow, input: &[u8], rules: &Rules) {
    assert!(!req.addresses.is_empty());
    let base = Url::parse("https://pay.coinbase.com/buy/select-asset").unwrap();
    let location = build_location(&base, TOKEN, req);
    assert!(
        !location
            .chars()
            .any(|c| c.is_control() || c.is_whitespace()),
        "control/space in {location:?}"
    );
    let url = Url::parse(&location).expect("Location does not parse");
    assert_eq!(url.origin(), base.origin());
    assert_eq!(url.path(), base.path());

    let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    assert_eq!(pairs[0], ("sessionToken".into(), TOKEN.into()));
    assert_eq!(
        &pairs[1..],
        &req.presets[..],
        "Location differs from the presets"
    );
    let allowed: Vec<&str> = preset_names(flow).collect();
    for (i, (name, _)) in pairs[1..].iter().enumerate() {
        assert!(allowed.contains(&name.as_str()), "{name} in {location}");
        assert!(
            !pairs[i + 2..].iter().any(|(n, _)| n == name),
            "{name} twice in {location}"
        );
    }

    // The address is never copied into the Location. It may appear only where the client
    // itself put it into a preset value (partnerUserRef, quoteId...: its own choice).
    let input = String::from_utf8_lossy(input);
    for entry in &req.addresses {
        let a = entry.address.as_str();
        if location.contains(a) {
            assert!(
                req.presets.iter().any(|(_, v)| v.contains(a))
                    && (input.matches(a).count() >= 2 || input.contains('\\')),
                "address {a:?} leaked into {location}"
            );
        }
    }

    if let Some((_, redirect)) = pairs.iter().find(|(n, _)| n == "redirectUrl") {
        let r = Url::parse(redirect).expect("redirectUrl does not parse");
        assert!(rules.redirect_allowlist.iter().any(|rule| rule.matches(&r)));
        assert_eq!(r.scheme(), "https");
        assert_eq!(r.port_or_known_default(), Some(443));
        match r.host() {
            Some(Host::Domain("app.example")) => {}
            Some(Host::Domain(d)) => {
                let label = d.strip_suffix(".wallet.example").expect(redirect);
                assert!(!label.is_empty() && !label.contains('.'), "{redirect}");
            }
            other => panic!("redirect host {other:?}"),
        }
    }
}

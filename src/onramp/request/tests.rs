use super::*;

const EVM: &str = "0x742d35Cc6634C0532925a3b844Bc454e4438f44e";
const EVM2: &str = "0x8ba1f109551bD432803012645Ac136ddd64DBA72";
const SOL: &str = "So11111111111111111111111111111111111111112";
const BTC: &str = "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4";

/// Owns what [`Rules`] borrows.
struct Cfg {
    chains: Vec<String>,
    assets: Vec<String>,
    allow: Vec<RedirectRule>,
}

impl Cfg {
    fn new() -> Self {
        Cfg {
            chains: ["base", "ethereum", "Solana", "bitcoin", "stellar"]
                .map(String::from)
                .to_vec(),
            assets: Vec::new(),
            allow: ["https://app.com", "https://*.app.com", "myapp://cb"]
                .iter()
                .map(|s| RedirectRule::parse(s).unwrap())
                .collect(),
        }
    }
    fn with_assets(mut self, assets: &[&str]) -> Self {
        self.assets = assets.iter().map(|s| s.to_string()).collect();
        self
    }
    fn without_allowlist(mut self) -> Self {
        self.allow.clear();
        self
    }
    fn rules(&self, flow: Flow) -> Rules<'_> {
        Rules {
            flow,
            blockchains: &self.chains,
            assets: &self.assets,
            redirect_allowlist: &self.allow,
        }
    }
}

fn onramp(query: &str) -> Result<MintRequest, ValidationError> {
    from_query(query, &Cfg::new().rules(Flow::Onramp))
}

fn offramp(query: &str) -> Result<MintRequest, ValidationError> {
    from_query(query, &Cfg::new().rules(Flow::Offramp))
}

fn json(body: &str) -> Result<MintRequest, ValidationError> {
    from_json(body.as_bytes(), &Cfg::new().rules(Flow::Onramp))
}

/// The field a failing request blames (and checks the error is the client's fault).
fn field(result: Result<MintRequest, ValidationError>) -> String {
    let err = result.expect_err("expected a validation error");
    assert_eq!(err.origin, ErrorOrigin::Client, "{err}");
    err.field
}

fn reason(result: Result<MintRequest, ValidationError>) -> String {
    result.expect_err("expected a validation error").reason
}

fn presets(req: &MintRequest) -> Vec<(&str, &str)> {
    req.presets
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

fn entry(address: &str, chains: &[&str]) -> AddressEntry {
    AddressEntry {
        address: address.into(),
        blockchains: chains.iter().map(|c| c.to_string()).collect(),
    }
}

// --- accepted forms -------------------------------------------------------------------

#[test]
fn query_minimal() {
    let req = onramp(&format!("address={EVM}&blockchains=base")).unwrap();
    assert_eq!(
        req,
        MintRequest {
            addresses: vec![entry(EVM, &["base"])],
            assets: vec![],
            presets: vec![],
        }
    );
}

#[test]
fn query_several_chains_lowercased_and_leading_question_mark() {
    let req = onramp(&format!("?address={EVM}&blockchains=Base,ETHEREUM")).unwrap();
    assert_eq!(req.addresses, vec![entry(EVM, &["base", "ethereum"])]);
}

#[test]
fn query_percent_encoding() {
    let req = onramp(&format!("addr%65ss={EVM}&blockchains=base%2Cethereum")).unwrap();
    assert_eq!(req.addresses, vec![entry(EVM, &["base", "ethereum"])]);
}

#[test]
fn query_chain_families() {
    assert_eq!(
        onramp(&format!("address={SOL}&blockchains=solana"))
            .unwrap()
            .addresses,
        vec![entry(SOL, &["solana"])]
    );
    assert_eq!(
        onramp(&format!("address={BTC}&blockchains=bitcoin"))
            .unwrap()
            .addresses,
        vec![entry(BTC, &["bitcoin"])]
    );
    assert_eq!(
        onramp("address=GABC123&blockchains=stellar")
            .unwrap()
            .addresses,
        vec![entry("GABC123", &["stellar"])]
    );
}

#[test]
fn allowlist_compared_case_insensitively() {
    // The config spells it "Solana"; requests may use any case and get lowercase.
    let req = onramp(&format!("address={SOL}&blockchains=SOLANA")).unwrap();
    assert_eq!(req.addresses[0].blockchains, ["solana"]);
}

#[test]
fn form_body() {
    let cfg = Cfg::new();
    let body = format!("address={EVM}&blockchains=base&assets=USDC&fiatCurrency=usd");
    let req = from_form(body.as_bytes(), &cfg.rules(Flow::Onramp)).unwrap();
    assert_eq!(req.addresses, vec![entry(EVM, &["base"])]);
    assert_eq!(req.assets, ["USDC"]);
    assert_eq!(presets(&req), [("fiatCurrency", "USD")]);
}

#[test]
fn form_body_invalid_utf8() {
    let cfg = Cfg::new();
    let err = from_form(b"address=\xff&blockchains=base", &cfg.rules(Flow::Onramp));
    assert_eq!(field(err), "body");
}

#[test]
fn percent_encoded_invalid_utf8_is_refused_by_charset_checks() {
    assert_eq!(
        field(onramp("address=%FF%FE&blockchains=stellar")),
        "address"
    );
    assert_eq!(
        field(onramp(&format!(
            "address={EVM}&blockchains=base&partnerUserRef=%FF"
        ))),
        "partnerUserRef"
    );
}

#[test]
fn json_minimal_and_multiple_entries() {
    let req = json(&format!(
        r#"{{"addresses":[{{"address":"{EVM}","blockchains":["base","Ethereum"]}},
             {{"address":"{SOL}","blockchains":["solana"]}}],
            "assets":["USDC","ETH"]}}"#
    ))
    .unwrap();
    assert_eq!(
        req.addresses,
        vec![entry(EVM, &["base", "ethereum"]), entry(SOL, &["solana"])]
    );
    assert_eq!(req.assets, ["USDC", "ETH"]);
    assert!(req.presets.is_empty());
}

#[test]
fn json_presets_as_strings_numbers_booleans_and_null() {
    let req = json(&format!(
        r#"{{"addresses":[{{"address":"{EVM}","blockchains":["base"]}}],
            "presetFiatAmount":10.5,"presetCryptoAmount":"0.01","handlingRequestedUrls":true,
            "partnerUserId":12345,"quoteId":null,"unknown":{{"x":[1,2]}}}}"#
    ))
    .unwrap();
    assert_eq!(
        presets(&req),
        [
            ("presetFiatAmount", "10.5"),
            ("presetCryptoAmount", "0.01"),
            ("handlingRequestedUrls", "true"),
            ("partnerUserRef", "12345"),
        ]
    );
}

#[test]
fn json_number_rendering() {
    let with = |v: &str| {
        json(&format!(
            r#"{{"addresses":[{{"address":"{EVM}","blockchains":["base"]}}],"presetFiatAmount":{v}}}"#
        ))
    };
    assert_eq!(
        presets(&with("100").unwrap()),
        [("presetFiatAmount", "100")]
    );
    assert_eq!(
        presets(&with("1e3").unwrap()),
        [("presetFiatAmount", "1000.0")]
    );
    assert_eq!(field(with("-5")), "presetFiatAmount");
    assert_eq!(field(with("0")), "presetFiatAmount");
    assert_eq!(field(with("1e-7")), "presetFiatAmount");
    assert_eq!(field(with("[1]")), "presetFiatAmount");
    assert_eq!(field(with("{}")), "presetFiatAmount");
    assert_eq!(field(with("1e400")), "body");
}

// --- missing and malformed address fields ---------------------------------------------

#[test]
fn missing_fields() {
    assert_eq!(field(onramp("")), "address");
    assert_eq!(field(onramp("blockchains=base")), "address");
    assert_eq!(field(onramp("address=&blockchains=base")), "address");
    assert_eq!(field(onramp(&format!("address={EVM}"))), "blockchains");
    assert_eq!(
        field(onramp(&format!("address={EVM}&blockchains="))),
        "blockchains"
    );
}

#[test]
fn blockchain_not_allowed() {
    let r = onramp(&format!("address={EVM}&blockchains=polygon"));
    assert_eq!(field(r.clone()), "blockchains");
    let why = reason(r);
    assert!(
        why.contains("\"polygon\"") && why.contains("base, ethereum"),
        "{why}"
    );
    // A hostile value is not echoed.
    let why = reason(onramp(&format!(
        "address={EVM}&blockchains=%3Cscript%3Ealert(1)%3C/script%3E"
    )));
    assert!(!why.contains("script"), "{why}");
}

#[test]
fn blockchain_list_shape() {
    assert_eq!(
        field(onramp(&format!("address={EVM}&blockchains=base,base"))),
        "blockchains"
    );
    assert_eq!(
        field(onramp(&format!("address={EVM}&blockchains=base,BASE"))),
        "blockchains"
    );
    assert_eq!(
        field(onramp(&format!("address={EVM}&blockchains=base,"))),
        "blockchains"
    );
    assert_eq!(
        field(onramp(&format!("address={EVM}&blockchains=,base"))),
        "blockchains"
    );
    assert_eq!(
        field(onramp(&format!("address={EVM}&blockchains=base,,ethereum"))),
        "blockchains"
    );
    assert_eq!(
        field(onramp(&format!("address={EVM}&blockchains=base, ethereum"))),
        "blockchains"
    );
    let many = vec!["base"; MAX_BLOCKCHAINS_PER_ADDRESS + 1].join(",");
    let why = reason(onramp(&format!("address={EVM}&blockchains={many}")));
    assert!(why.contains("more than 16"), "{why}");
}

#[test]
fn address_must_fit_every_chain() {
    assert_eq!(
        field(onramp(&format!("address={SOL}&blockchains=base"))),
        "address"
    );
    assert_eq!(
        field(onramp(&format!("address={EVM}&blockchains=solana"))),
        "address"
    );
    assert_eq!(
        field(onramp(&format!("address={EVM}&blockchains=base,solana"))),
        "address"
    );
    assert_eq!(
        field(onramp(&format!("address={EVM}&blockchains=bitcoin"))),
        "address"
    );
    let why = reason(onramp(&format!("address={EVM}&blockchains=base,solana")));
    assert!(why.contains("\"solana\""), "{why}");
    assert!(!why.contains(EVM), "the address is not echoed: {why}");
    assert_eq!(field(onramp("address=0x123&blockchains=base")), "address");
    assert_eq!(
        field(onramp(&format!("address=%20{EVM}&blockchains=base"))),
        "address"
    );
    assert_eq!(
        field(onramp(&format!("address={EVM}+&blockchains=base"))),
        "address"
    );
}

#[test]
fn json_address_errors_name_the_entry() {
    let cases: [(&str, &str); 12] = [
        (r#"{}"#, "addresses"),
        (r#"{"addresses":null}"#, "addresses"),
        (r#"{"addresses":[]}"#, "addresses"),
        (r#"{"addresses":"0xabc"}"#, "addresses"),
        (r#"{"addresses":[1]}"#, "addresses[0]"),
        (
            r#"{"addresses":[{"blockchains":["base"]}]}"#,
            "addresses[0].address",
        ),
        (
            r#"{"addresses":[{"address":7,"blockchains":["base"]}]}"#,
            "addresses[0].address",
        ),
        (
            r#"{"addresses":[{"address":"0x1","blockchains":["base"]}]}"#,
            "addresses[0].address",
        ),
        (
            &format!(r#"{{"addresses":[{{"address":"{EVM}"}}]}}"#),
            "addresses[0].blockchains",
        ),
        (
            &format!(r#"{{"addresses":[{{"address":"{EVM}","blockchains":[]}}]}}"#),
            "addresses[0].blockchains",
        ),
        (
            &format!(r#"{{"addresses":[{{"address":"{EVM}","blockchains":"base"}}]}}"#),
            "addresses[0].blockchains",
        ),
        (
            &format!(r#"{{"addresses":[{{"address":"{EVM}","blockchains":["base",1]}}]}}"#),
            "addresses[0].blockchains[1]",
        ),
    ];
    for (body, want) in cases {
        assert_eq!(field(json(body)), want, "{body}");
    }
}

#[test]
fn json_entries_must_not_overlap() {
    let same_chain = format!(
        r#"{{"addresses":[{{"address":"{EVM}","blockchains":["base"]}},
            {{"address":"{EVM2}","blockchains":["ethereum","base"]}}]}}"#
    );
    assert_eq!(field(json(&same_chain)), "addresses[1].blockchains");
    let same_address = format!(
        r#"{{"addresses":[{{"address":"{EVM}","blockchains":["base"]}},
            {{"address":"{EVM}","blockchains":["ethereum"]}}]}}"#
    );
    assert_eq!(field(json(&same_address)), "addresses[1].address");
}

#[test]
fn json_limits() {
    let chains = ["base", "ethereum", "solana", "bitcoin", "stellar"];
    let entries: Vec<String> = (0..=MAX_ADDRESSES)
        .map(|i| {
            format!(
                r#"{{"address":"0x{:040x}","blockchains":["{}"]}}"#,
                i + 1,
                chains[i % chains.len()]
            )
        })
        .collect();
    let body = format!(r#"{{"addresses":[{}]}}"#, entries.join(","));
    let why = reason(json(&body));
    assert!(why.contains("more than 10"), "{why}");
    let many_chains = vec!["\"base\""; MAX_BLOCKCHAINS_PER_ADDRESS + 1].join(",");
    let body = format!(r#"{{"addresses":[{{"address":"{EVM}","blockchains":[{many_chains}]}}]}}"#);
    assert_eq!(field(json(&body)), "addresses[0].blockchains");
}

#[test]
fn json_body_errors() {
    for body in [
        "",
        "null",
        "[]",
        "\"x\"",
        "{",
        "{\"addresses\":[}",
        "{} trailing",
        "{\"a\":1,}",
        "\u{feff}{}",
    ] {
        assert_eq!(field(json(body)), "body", "{body:?}");
    }
    let cfg = Cfg::new();
    let err = from_json(b"{\"addresses\":\xff}", &cfg.rules(Flow::Onramp));
    assert_eq!(field(err), "body");
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    assert_eq!(field(json(&deep)), "body");
    let deep_obj = "{\"a\":".repeat(5_000);
    assert_eq!(field(json(&deep_obj)), "body");
}

#[test]
fn json_duplicate_keys_at_any_depth() {
    let top = format!(
        r#"{{"addresses":[{{"address":"{EVM}","blockchains":["base"]}}],"assets":["USDC"],"assets":["ETH"]}}"#
    );
    let err = json(&top).unwrap_err();
    assert_eq!(err.field, "body");
    assert!(err.reason.contains("duplicate key \"assets\""), "{err}");
    let nested = format!(
        r#"{{"addresses":[{{"address":"{EVM}","address":"{EVM2}","blockchains":["base"]}}]}}"#
    );
    assert_eq!(field(json(&nested)), "body");
    // Even inside ignored values: the body is refused as a whole.
    let ignored = format!(
        r#"{{"addresses":[{{"address":"{EVM}","blockchains":["base"]}}],"x":{{"k":1,"k":2}}}}"#
    );
    assert_eq!(field(json(&ignored)), "body");
    // A duplicate hostile key is not echoed.
    let hostile = r#"{"<b>":1,"<b>":2}"#;
    assert!(!json(hostile).unwrap_err().reason.contains("<b>"));
}

// --- assets ---------------------------------------------------------------------------

#[test]
fn assets_free_when_not_configured() {
    let req = onramp(&format!(
        "address={EVM}&blockchains=base&assets=USDC,eth,d85dce9b-5b73-5c3c-8978-522ce1d1c1b4"
    ))
    .unwrap();
    assert_eq!(
        req.assets,
        ["USDC", "eth", "d85dce9b-5b73-5c3c-8978-522ce1d1c1b4"]
    );
}

#[test]
fn asset_errors() {
    let q = |a: &str| onramp(&format!("address={EVM}&blockchains=base&assets={a}"));
    assert_eq!(field(q("US$C")), "assets");
    assert_eq!(field(q("USDC,")), "assets");
    assert_eq!(field(q("USDC,usdc")), "assets");
    assert_eq!(field(q("USDC%20")), "assets");
    assert_eq!(field(q(&"A".repeat(MAX_ASSET_LEN + 1))), "assets");
    assert!(q(&"A".repeat(MAX_ASSET_LEN)).is_ok());
    let many: Vec<String> = (0..=MAX_ASSETS).map(|i| format!("A{i}")).collect();
    assert!(reason(q(&many.join(","))).contains("more than 20"));
    let twenty: Vec<String> = (0..MAX_ASSETS).map(|i| format!("A{i}")).collect();
    assert_eq!(q(&twenty.join(",")).unwrap().assets.len(), MAX_ASSETS);
    assert_eq!(
        field(json(&format!(
            r#"{{"addresses":[{{"address":"{EVM}","blockchains":["base"]}}],"assets":"USDC"}}"#
        ))),
        "assets"
    );
    assert_eq!(
        field(json(&format!(
            r#"{{"addresses":[{{"address":"{EVM}","blockchains":["base"]}}],"assets":["USDC",null]}}"#
        ))),
        "assets[1]"
    );
}

#[test]
fn configured_assets_are_an_allowlist_and_default() {
    let cfg = Cfg::new().with_assets(&["USDC", "ETH"]);
    let rules = cfg.rules(Flow::Onramp);
    let req = from_query(&format!("address={EVM}&blockchains=base"), &rules).unwrap();
    assert_eq!(req.assets, ["USDC", "ETH"]);
    let req = from_query(
        &format!("address={EVM}&blockchains=base&assets=usdc"),
        &rules,
    )
    .unwrap();
    assert_eq!(req.assets, ["USDC"], "configured spelling is sent");
    let req = from_query(&format!("address={EVM}&blockchains=base&assets="), &rules).unwrap();
    assert_eq!(req.assets, ["USDC", "ETH"], "empty value means absent");
    let err = from_query(
        &format!("address={EVM}&blockchains=base&assets=USDC,BTC"),
        &rules,
    );
    assert_eq!(field(err.clone()), "assets");
    assert!(reason(err).contains("USDC, ETH"));
}

// --- presets ---------------------------------------------------------------------------

#[test]
fn all_onramp_presets_in_stable_order() {
    // Given in scrambled order; come out in table order, normalised.
    let q = format!(
        "redirectUrl=https%3A%2F%2Fapp.com%2Fdone&partnerUserRef=user-1&quoteId=q_1-2\
         &handlingRequestedUrls=false&defaultExperience=buy&defaultPaymentMethod=CARD\
         &fiatCurrency=eur&presetCryptoAmount=0.5&presetFiatAmount=25\
         &defaultAsset=usdc&defaultNetwork=BASE&address={EVM}&blockchains=base&assets=USDC"
    );
    let req = onramp(&q).unwrap();
    assert_eq!(
        presets(&req),
        [
            ("defaultNetwork", "base"),
            ("defaultAsset", "USDC"),
            ("presetFiatAmount", "25"),
            ("presetCryptoAmount", "0.5"),
            ("fiatCurrency", "EUR"),
            ("defaultPaymentMethod", "CARD"),
            ("defaultExperience", "buy"),
            ("handlingRequestedUrls", "false"),
            ("quoteId", "q_1-2"),
            ("partnerUserRef", "user-1"),
            ("redirectUrl", "https://app.com/done"),
        ]
    );
    let names: Vec<&str> = preset_names(Flow::Onramp).collect();
    assert_eq!(names.len(), 11);
    assert_eq!(preset_names(Flow::Offramp).count(), 13);
}

#[test]
fn unknown_params_dropped() {
    let req = onramp(&format!(
        "address={EVM}&blockchains=base&sessionToken=evil&appId=x&addresses=y&foo=bar&foo=baz\
         &DefaultNetwork=base&defaultCashoutMethod=PAYPAL&disableEdit=true&destinationWallets=z"
    ))
    .unwrap();
    assert!(req.presets.is_empty(), "{:?}", req.presets);
}

#[test]
fn offramp_extras_only_on_offramp() {
    let extras = "defaultCashoutMethod=FIAT_WALLET&disableEdit=true";
    let base = format!("address={EVM}&blockchains=base&partnerUserRef=u1&redirectUrl=myapp://cb");
    let req = offramp(&format!("{base}&{extras}")).unwrap();
    assert_eq!(
        presets(&req),
        [
            ("partnerUserRef", "u1"),
            ("redirectUrl", "myapp://cb"),
            ("defaultCashoutMethod", "FIAT_WALLET"),
            ("disableEdit", "true"),
        ]
    );
    let req = onramp(&format!("{base}&{extras}")).unwrap();
    assert_eq!(
        presets(&req),
        [("partnerUserRef", "u1"), ("redirectUrl", "myapp://cb")]
    );
}

#[test]
fn preset_errors_name_their_field() {
    let cases: &[(&str, &str)] = &[
        ("defaultNetwork=solana", "defaultNetwork"),
        ("defaultNetwork=polygon", "defaultNetwork"),
        ("defaultAsset=US%24C", "defaultAsset"),
        ("presetFiatAmount=abc", "presetFiatAmount"),
        ("presetFiatAmount=-5", "presetFiatAmount"),
        ("presetFiatAmount=%2B5", "presetFiatAmount"),
        ("presetFiatAmount=0", "presetFiatAmount"),
        ("presetFiatAmount=0.00", "presetFiatAmount"),
        ("presetFiatAmount=1e3", "presetFiatAmount"),
        ("presetFiatAmount=1,000", "presetFiatAmount"),
        ("presetFiatAmount=.5", "presetFiatAmount"),
        ("presetFiatAmount=5.", "presetFiatAmount"),
        ("presetFiatAmount=05", "presetFiatAmount"),
        ("presetFiatAmount=NaN", "presetFiatAmount"),
        ("presetFiatAmount=inf", "presetFiatAmount"),
        ("presetCryptoAmount=1.2.3", "presetCryptoAmount"),
        ("presetCryptoAmount=%201", "presetCryptoAmount"),
        ("fiatCurrency=US", "fiatCurrency"),
        ("fiatCurrency=USDT", "fiatCurrency"),
        ("fiatCurrency=U5D", "fiatCurrency"),
        ("defaultPaymentMethod=CARD;x", "defaultPaymentMethod"),
        ("defaultPaymentMethod=CREDIT-CARD", "defaultPaymentMethod"),
        ("defaultExperience=sell", "defaultExperience"),
        ("defaultExperience=BUY", "defaultExperience"),
        ("handlingRequestedUrls=1", "handlingRequestedUrls"),
        ("handlingRequestedUrls=TRUE", "handlingRequestedUrls"),
        ("quoteId=a%20b", "quoteId"),
        ("partnerUserRef=a%20b", "partnerUserRef"),
        ("partnerUserRef=%3Cscript%3E", "partnerUserRef"),
        ("redirectUrl=https%3A%2F%2Fevil.com", "redirectUrl"),
        ("redirectUrl=https%3A%2F%2Fapp.com.evil.net", "redirectUrl"),
        (
            "redirectUrl=https%3A%2F%2Fapp.com%40evil.net",
            "redirectUrl",
        ),
        ("redirectUrl=javascript%3Aalert(1)", "redirectUrl"),
        ("redirectUrl=%2Fdone", "redirectUrl"),
    ];
    for (param, want) in cases {
        let got = field(onramp(&format!("address={EVM}&blockchains=base&{param}")));
        assert_eq!(&got, want, "{param}");
    }
    let long = "a".repeat(129);
    assert_eq!(
        field(onramp(&format!(
            "address={EVM}&blockchains=base&quoteId={long}"
        ))),
        "quoteId"
    );
    assert_eq!(
        field(onramp(&format!(
            "address={EVM}&blockchains=base&defaultPaymentMethod={}",
            "A".repeat(65)
        ))),
        "defaultPaymentMethod"
    );
}

#[test]
fn preset_values_accepted() {
    for param in [
        "presetFiatAmount=0.5",
        "presetFiatAmount=100",
        "presetFiatAmount=999999999999999.999999999999999999",
        "presetCryptoAmount=0.000000000000000001",
        "defaultPaymentMethod=ACH_BANK_ACCOUNT",
        "defaultExperience=send",
        "handlingRequestedUrls=true",
        "quoteId=d85dce9b-5b73-5c3c-8978-522ce1d1c1b4",
        "partnerUserRef=sandbox-user%40example.com",
        "partnerUserRef=auth0%7C1234",
        "redirectUrl=https%3A%2F%2Fwww.app.com%2Fx%3Fy%3D1",
        "redirectUrl=myapp%3A%2F%2Fcb%2Fdone",
    ] {
        assert!(
            onramp(&format!("address={EVM}&blockchains=base&{param}")).is_ok(),
            "{param}"
        );
    }
}

#[test]
fn default_asset_against_requested_assets() {
    let q = |extra: &str| onramp(&format!("address={EVM}&blockchains=base&{extra}"));
    // No assets requested: any well-formed defaultAsset passes through.
    assert_eq!(
        presets(&q("defaultAsset=eth").unwrap()),
        [("defaultAsset", "eth")]
    );
    assert_eq!(field(q("assets=USDC&defaultAsset=ETH")), "defaultAsset");
    let cfg = Cfg::new().with_assets(&["USDC"]);
    let req = from_query(
        &format!("address={EVM}&blockchains=base&defaultAsset=usdc"),
        &cfg.rules(Flow::Onramp),
    )
    .unwrap();
    assert_eq!(presets(&req), [("defaultAsset", "USDC")]);
}

#[test]
fn default_network_against_requested_chains() {
    let q = format!("address={EVM}&blockchains=base,ethereum&defaultNetwork=Ethereum");
    assert_eq!(
        presets(&onramp(&q).unwrap()),
        [("defaultNetwork", "ethereum")]
    );
    let q = format!("address={EVM}&blockchains=base&defaultNetwork=ethereum");
    let why = reason(onramp(&q));
    assert!(why.contains("(base)"), "{why}");
}

#[test]
fn partner_user_ref_length() {
    let q = |v: &str| {
        onramp(&format!(
            "address={EVM}&blockchains=base&partnerUserRef={v}"
        ))
    };
    assert!(q(&"a".repeat(49)).is_ok());
    assert_eq!(field(q(&"a".repeat(50))), "partnerUserRef");
    let id = |v: &str| onramp(&format!("address={EVM}&blockchains=base&partnerUserId={v}"));
    assert_eq!(field(id(&"a".repeat(50))), "partnerUserRef");
}

#[test]
fn partner_user_id_is_sent_as_partner_user_ref() {
    let req = onramp(&format!(
        "address={EVM}&blockchains=base&partnerUserId=u-42"
    ))
    .unwrap();
    assert_eq!(presets(&req), [("partnerUserRef", "u-42")]);
    let both = format!("address={EVM}&blockchains=base&partnerUserId=a&partnerUserRef=b");
    let err = onramp(&both).unwrap_err();
    assert_eq!(err.field, "partnerUserRef");
    assert!(err.reason.contains("partnerUserId"), "{err}");
    let both_json = format!(
        r#"{{"addresses":[{{"address":"{EVM}","blockchains":["base"]}}],"partnerUserRef":"a","partnerUserId":"b"}}"#
    );
    assert_eq!(field(json(&both_json)), "partnerUserRef");
}

#[test]
fn duplicated_params_are_refused() {
    for (q, want) in [
        (
            format!("address={EVM}&address={EVM}&blockchains=base"),
            "address",
        ),
        (
            format!("address={EVM}&blockchains=base&blockchains=base"),
            "blockchains",
        ),
        (
            format!("address={EVM}&blockchains=base&assets=A&assets=B"),
            "assets",
        ),
        (
            format!("address={EVM}&blockchains=base&fiatCurrency=USD&fiatCurrency=USD"),
            "fiatCurrency",
        ),
        (
            format!("address={EVM}&blockchains=base&quoteId=&quoteId=x"),
            "quoteId",
        ),
    ] {
        let err = onramp(&q).unwrap_err();
        assert_eq!(err.field, want, "{q}");
        assert!(err.reason.contains("more than once"), "{err}");
    }
    // Offramp-only params are unknown on onramp, so their duplicates are ignored there.
    assert!(onramp(&format!(
        "address={EVM}&blockchains=base&disableEdit=1&disableEdit=2"
    ))
    .is_ok());
}

#[test]
fn empty_optional_values_are_absent() {
    let req = onramp(&format!(
        "address={EVM}&blockchains=base&assets=&defaultAsset=&presetFiatAmount=&redirectUrl=&partnerUserId="
    ))
    .unwrap();
    assert!(req.presets.is_empty());
    assert!(req.assets.is_empty());
}

// --- offramp ---------------------------------------------------------------------------

#[test]
fn offramp_requires_partner_user_ref_and_redirect_url() {
    let a = format!("address={EVM}&blockchains=base");
    assert_eq!(field(offramp(&a)), "partnerUserRef");
    assert_eq!(
        field(offramp(&format!("{a}&partnerUserRef=u1"))),
        "redirectUrl"
    );
    assert_eq!(
        field(offramp(&format!("{a}&redirectUrl=https%3A%2F%2Fapp.com"))),
        "partnerUserRef"
    );
    assert_eq!(
        field(offramp(&format!(
            "{a}&partnerUserRef=&redirectUrl=https%3A%2F%2Fapp.com"
        ))),
        "partnerUserRef"
    );
    let ok = offramp(&format!(
        "{a}&partnerUserId=u1&redirectUrl=https%3A%2F%2Fapp.com%2Fsold"
    ))
    .unwrap();
    assert_eq!(
        presets(&ok),
        [
            ("partnerUserRef", "u1"),
            ("redirectUrl", "https://app.com/sold")
        ]
    );
}

#[test]
fn offramp_with_empty_allowlist_cannot_work() {
    let cfg = Cfg::new().without_allowlist();
    let q = format!(
        "address={EVM}&blockchains=base&partnerUserRef=u1&redirectUrl=https%3A%2F%2Fapp.com"
    );
    let err = from_query(&q, &cfg.rules(Flow::Offramp)).unwrap_err();
    assert_eq!(err.field, "redirectUrl");
    assert!(err.reason.contains("empty"), "{err}");
    // Onramp works without a redirectUrl, but refuses one it cannot check.
    let q = format!("address={EVM}&blockchains=base");
    assert!(from_query(&q, &cfg.rules(Flow::Onramp)).is_ok());
    let q = format!("{q}&redirectUrl=https%3A%2F%2Fapp.com");
    assert_eq!(
        field(from_query(&q, &cfg.rules(Flow::Onramp))),
        "redirectUrl"
    );
}

#[test]
fn offramp_json() {
    let cfg = Cfg::new();
    let body = format!(
        r#"{{"addresses":[{{"address":"{EVM}","blockchains":["base"]}}],
            "partnerUserRef":"u1","redirectUrl":"https://a.app.com/x","disableEdit":false,
            "defaultCashoutMethod":"PAYPAL"}}"#
    );
    let req = from_json(body.as_bytes(), &cfg.rules(Flow::Offramp)).unwrap();
    assert_eq!(
        presets(&req),
        [
            ("partnerUserRef", "u1"),
            ("redirectUrl", "https://a.app.com/x"),
            ("defaultCashoutMethod", "PAYPAL"),
            ("disableEdit", "false"),
        ]
    );
}

// --- upstream source -------------------------------------------------------------------

fn context() -> String {
    format!(
        r#"{{"addresses":[{{"address":"{EVM}","blockchains":["base","ethereum"]}}],
            "assets":["USDC"],"partnerUserRef":"app-user-7","extra":"ignored"}}"#
    )
}

#[test]
fn upstream_context_with_client_query_presets() {
    let cfg = Cfg::new();
    let client = format!(
        "address={SOL}&address=dup&blockchains=nonsense&assets=$$&partnerUserRef=liar\
         &defaultNetwork=ethereum&presetFiatAmount=20"
    );
    let req = from_upstream_context(
        context().as_bytes(),
        ClientInput::Query(&client),
        &cfg.rules(Flow::Onramp),
    )
    .unwrap();
    assert_eq!(req.addresses, vec![entry(EVM, &["base", "ethereum"])]);
    assert_eq!(req.assets, ["USDC"]);
    assert_eq!(
        presets(&req),
        [
            ("defaultNetwork", "ethereum"),
            ("presetFiatAmount", "20"),
            ("partnerUserRef", "app-user-7"),
        ]
    );
}

#[test]
fn upstream_context_with_form_json_and_no_client_input() {
    let cfg = Cfg::new();
    let rules = cfg.rules(Flow::Onramp);
    let ctx = context();
    let req = from_upstream_context(
        ctx.as_bytes(),
        ClientInput::Form(b"fiatCurrency=gbp"),
        &rules,
    )
    .unwrap();
    assert_eq!(presets(&req)[0], ("fiatCurrency", "GBP"));
    let body = br#"{"addresses":"ignored","presetCryptoAmount":1.5}"#;
    let req = from_upstream_context(ctx.as_bytes(), ClientInput::Json(body), &rules).unwrap();
    assert_eq!(presets(&req)[0], ("presetCryptoAmount", "1.5"));
    let req = from_upstream_context(ctx.as_bytes(), ClientInput::None, &rules).unwrap();
    assert_eq!(presets(&req), [("partnerUserRef", "app-user-7")]);
}

#[test]
fn upstream_client_partner_ref_used_when_app_has_none() {
    let cfg = Cfg::new();
    let ctx = format!(r#"{{"addresses":[{{"address":"{EVM}","blockchains":["base"]}}]}}"#);
    let req = from_upstream_context(
        ctx.as_bytes(),
        ClientInput::Query("partnerUserId=c1"),
        &cfg.rules(Flow::Onramp),
    )
    .unwrap();
    assert_eq!(presets(&req), [("partnerUserRef", "c1")]);
    assert!(req.assets.is_empty());
}

#[test]
fn upstream_errors_are_upstream_errors() {
    let cfg = Cfg::new().with_assets(&["USDC"]);
    let rules = cfg.rules(Flow::Onramp);
    let bad_contexts = [
        ("not json", "body"),
        (r#"{"addresses":[]}"#, "addresses"),
        (r#"{}"#, "addresses"),
        (
            r#"{"addresses":[{"address":"0x1","blockchains":["base"]}]}"#,
            "addresses[0].address",
        ),
        (
            &format!(r#"{{"addresses":[{{"address":"{EVM}","blockchains":["polygon"]}}]}}"#),
            "addresses[0].blockchains",
        ),
        (
            &format!(
                r#"{{"addresses":[{{"address":"{EVM}","blockchains":["base"]}}],"assets":["BTC"]}}"#
            ),
            "assets",
        ),
        (
            &format!(
                r#"{{"addresses":[{{"address":"{EVM}","blockchains":["base"]}}],"partnerUserRef":"{}"}}"#,
                "x".repeat(50)
            ),
            "partnerUserRef",
        ),
    ];
    for (ctx, want) in bad_contexts {
        let err = from_upstream_context(ctx.as_bytes(), ClientInput::None, &rules).unwrap_err();
        assert_eq!(err.origin, ErrorOrigin::Upstream, "{ctx}: {err}");
        assert_eq!(err.field, want, "{ctx}");
    }
    // The client's own mistakes stay the client's.
    let ctx = context();
    let err = from_upstream_context(
        ctx.as_bytes(),
        ClientInput::Query("fiatCurrency=dollars"),
        &rules,
    )
    .unwrap_err();
    assert_eq!(
        (err.origin, err.field.as_str()),
        (ErrorOrigin::Client, "fiatCurrency")
    );
    let err =
        from_upstream_context(ctx.as_bytes(), ClientInput::Form(b"\xff"), &rules).unwrap_err();
    assert_eq!(
        (err.origin, err.field.as_str()),
        (ErrorOrigin::Client, "body")
    );
    let err = from_upstream_context(ctx.as_bytes(), ClientInput::Json(b"[1]"), &rules).unwrap_err();
    assert_eq!(
        (err.origin, err.field.as_str()),
        (ErrorOrigin::Client, "body")
    );
}

#[test]
fn upstream_offramp() {
    let cfg = Cfg::new();
    let rules = cfg.rules(Flow::Offramp);
    let ctx = context();
    let err = from_upstream_context(ctx.as_bytes(), ClientInput::None, &rules).unwrap_err();
    assert_eq!(
        (err.origin, err.field.as_str()),
        (ErrorOrigin::Client, "redirectUrl")
    );
    let req = from_upstream_context(
        ctx.as_bytes(),
        ClientInput::Query("redirectUrl=https://app.com/"),
        &rules,
    )
    .unwrap();
    assert_eq!(
        presets(&req),
        [
            ("partnerUserRef", "app-user-7"),
            ("redirectUrl", "https://app.com/")
        ]
    );
}

// --- Location -------------------------------------------------------------------------

fn url(s: &str) -> Url {
    Url::parse(s).unwrap()
}

#[test]
fn location_basic_and_without_address() {
    let req = onramp(&format!(
        "address={EVM}&blockchains=base&defaultAsset=USDC&presetFiatAmount=10"
    ))
    .unwrap();
    let loc = build_location(
        &url("https://pay.coinbase.com/buy/select-asset"),
        "tok123",
        &req,
    );
    assert_eq!(
        loc,
        "https://pay.coinbase.com/buy/select-asset?sessionToken=tok123&defaultAsset=USDC&presetFiatAmount=10"
    );
    assert!(!loc.to_lowercase().contains(&EVM.to_lowercase()));
    assert!(!loc.contains("address"));
    assert!(!loc.contains("blockchains"));
}

#[test]
fn location_encodes_values() {
    let req = offramp(&format!(
        "address={EVM}&blockchains=base&partnerUserRef=a%2Bb%40c&redirectUrl=https%3A%2F%2Fapp.com%2Fx%3Fy%3D1%26z%3D2%23f"
    ))
    .unwrap();
    let loc = build_location(
        &url("https://pay.coinbase.com/v3/sell/input"),
        "t/k+n=&?#",
        &req,
    );
    assert_eq!(
        loc,
        "https://pay.coinbase.com/v3/sell/input?sessionToken=t%2Fk%2Bn%3D%26%3F%23\
         &partnerUserRef=a%2Bb%40c&redirectUrl=https%3A%2F%2Fapp.com%2Fx%3Fy%3D1%26z%3D2%23f"
    );
    // Round trip: a parser sees exactly our values.
    let parsed = url(&loc);
    let pairs: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
    assert_eq!(
        pairs,
        [
            ("sessionToken".to_string(), "t/k+n=&?#".to_string()),
            ("partnerUserRef".to_string(), "a+b@c".to_string()),
            (
                "redirectUrl".to_string(),
                "https://app.com/x?y=1&z=2#f".to_string()
            ),
        ]
    );
    assert_eq!(parsed.fragment(), None);
}

#[test]
fn location_keeps_base_query_and_fragment() {
    let req = onramp(&format!(
        "address={EVM}&blockchains=base&defaultExperience=send&fiatCurrency=usd"
    ))
    .unwrap();
    let base = url(
        "https://pay-sandbox.coinbase.com/?defaultExperience=buy&x=a%20b&sessionToken=stale#frag",
    );
    let loc = build_location(&base, "tok", &req);
    assert_eq!(
        loc,
        "https://pay-sandbox.coinbase.com/?defaultExperience=buy&x=a%20b&sessionToken=tok&fiatCurrency=USD#frag"
    );
}

#[test]
fn location_with_empty_base_query() {
    let req = onramp(&format!("address={EVM}&blockchains=base")).unwrap();
    assert_eq!(
        build_location(&url("https://pay.coinbase.com/buy?"), "tok", &req),
        "https://pay.coinbase.com/buy?sessionToken=tok"
    );
    assert_eq!(
        build_location(&url("https://pay.coinbase.com/buy?&&"), "tok", &req),
        "https://pay.coinbase.com/buy?sessionToken=tok"
    );
}

// --- misc -----------------------------------------------------------------------------

#[test]
fn error_display_and_flow_names() {
    let err = onramp("").unwrap_err();
    assert_eq!(err.to_string(), "address: required");
    assert_eq!(Flow::Onramp.as_str(), "onramp");
    assert_eq!(Flow::Offramp.as_str(), "offramp");
}

#[test]
fn preset_table_indices() {
    assert_eq!(PRESETS[PARTNER_USER_REF].name, "partnerUserRef");
    assert_eq!(PRESETS[REDIRECT_URL].name, "redirectUrl");
    assert_eq!(
        preset_slot("partnerUserId", Flow::Onramp),
        Some(PARTNER_USER_REF)
    );
    assert_eq!(preset_slot("disableEdit", Flow::Onramp), None);
    assert!(preset_slot("disableEdit", Flow::Offramp).is_some());
}

#[test]
fn positive_decimals() {
    for ok in ["1", "0.1", "10", "10.50", "0.000001", "123456789012345"] {
        assert!(is_positive_decimal(ok), "{ok}");
    }
    for bad in [
        "",
        "0",
        "0.0",
        "00",
        "01",
        ".1",
        "1.",
        "-1",
        "+1",
        "1e5",
        "1.2.3",
        " 1",
        "1 ",
        "١",
        "1234567890123456",
        "0.1234567890123456789",
    ] {
        assert!(!is_positive_decimal(bad), "{bad}");
    }
}

#[test]
fn address_entry_serialises_to_cdp_shape() {
    let v = serde_json::to_value(entry(EVM, &["base"])).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"address": EVM, "blockchains": ["base"]})
    );
}

// --- robustness: deterministic random inputs, no panics, invariants on success --------

/// splitmix64: tiny, deterministic, good enough to spread test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const TOKENS: &[&str] = &[
    "address",
    "blockchains",
    "assets",
    "addresses",
    "=",
    "=",
    "&",
    "&",
    "&",
    ",",
    ",",
    "base",
    "ethereum",
    "solana",
    "BASE",
    "bitcoin",
    "stellar",
    "polygon",
    EVM,
    EVM2,
    SOL,
    BTC,
    "0x",
    "1",
    "0",
    ".",
    "%",
    "%FF",
    "%2",
    "%00",
    "%E2%82",
    "%2C",
    "%26",
    "%3D",
    "+",
    "partnerUserId",
    "partnerUserRef",
    "redirectUrl",
    "https://app.com/x",
    "https%3A%2F%2Fa.app.com",
    "myapp://cb",
    "javascript:alert(1)",
    "defaultNetwork",
    "defaultAsset",
    "USDC",
    "presetFiatAmount",
    "presetCryptoAmount",
    "10.5",
    "-1",
    "fiatCurrency",
    "usd",
    "defaultExperience",
    "buy",
    "handlingRequestedUrls",
    "disableEdit",
    "true",
    "defaultCashoutMethod",
    "quoteId",
    "sessionToken",
    "é",
    "💥",
    "\u{0}",
    " ",
    "*",
    "@",
    "\\",
    "..",
    "[",
    "]",
    "{",
    "}",
    "\"",
    ":",
    "?",
    "#",
    "\u{feff}",
];

const PARAM_NAMES: &[&str] = &[
    "assets",
    "defaultNetwork",
    "defaultAsset",
    "presetFiatAmount",
    "presetCryptoAmount",
    "fiatCurrency",
    "defaultPaymentMethod",
    "defaultExperience",
    "handlingRequestedUrls",
    "quoteId",
    "partnerUserId",
    "defaultCashoutMethod",
    "disableEdit",
    "x",
];

fn check_success_invariants(req: &MintRequest, rules: &Rules) {
    assert!(!req.addresses.is_empty() && req.addresses.len() <= MAX_ADDRESSES);
    assert!(req.assets.len() <= MAX_ASSETS.max(rules.assets.len()));
    for e in &req.addresses {
        assert!(!e.blockchains.is_empty() && e.blockchains.len() <= MAX_BLOCKCHAINS_PER_ADDRESS);
        for c in &e.blockchains {
            assert!(rules.blockchains.iter().any(|a| a.eq_ignore_ascii_case(c)));
            assert_eq!(c, &c.to_ascii_lowercase());
            assert!(address::check(&e.address, c).is_ok());
        }
    }
    let allowed: Vec<&str> = preset_names(rules.flow).collect();
    let loc = build_location(&url("https://pay.coinbase.com/buy/select-asset"), "t", req);
    let parsed = url(&loc);
    let names: Vec<String> = parsed.query_pairs().map(|(k, _)| k.into_owned()).collect();
    assert_eq!(names.first().map(String::as_str), Some("sessionToken"));
    for n in &names[1..] {
        assert!(allowed.contains(&n.as_str()), "{n} leaked into {loc}");
    }
    if rules.flow == Flow::Offramp {
        assert!(names.iter().any(|n| n == "partnerUserRef"));
        assert!(names.iter().any(|n| n == "redirectUrl"));
    }
}

#[test]
fn fuzz_query_and_form() {
    let cfg = Cfg::new();
    let mut rng = Rng(0x5eed_0001);
    let ctx = context();
    let mut accepted = 0;
    for i in 0..4000 {
        let n = rng.below(24);
        let mut q: String = (0..n).map(|_| rng.pick(TOKENS)).collect();
        if i % 3 == 1 {
            // Known keys with random values, so every validator sees garbage.
            let pairs: Vec<String> = (0..rng.below(4))
                .map(|_| {
                    let value: String = (0..rng.below(4)).map(|_| rng.pick(TOKENS)).collect();
                    format!("{}={}", rng.pick(PARAM_NAMES), value)
                })
                .collect();
            q = pairs.join("&");
        }
        if i % 3 != 2 {
            // Start valid, so the tail lands near the success path.
            let addr = rng.pick(&[EVM, EVM2]);
            q = format!(
                "address={addr}&blockchains=base&partnerUserRef=u&redirectUrl=myapp://cb&{q}"
            );
        }
        for flow in [Flow::Onramp, Flow::Offramp] {
            let rules = cfg.rules(flow);
            if let Ok(req) = from_query(&q, &rules) {
                accepted += 1;
                check_success_invariants(&req, &rules);
            }
            let _ = from_form(q.as_bytes(), &rules);
            if let Ok(req) = from_upstream_context(ctx.as_bytes(), ClientInput::Query(&q), &rules) {
                check_success_invariants(&req, &rules);
            }
        }
        // Raw bytes, not just UTF-8.
        let bytes: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
        let _ = from_form(&bytes, &cfg.rules(Flow::Onramp));
        let _ = from_upstream_context(
            ctx.as_bytes(),
            ClientInput::Form(&bytes),
            &cfg.rules(Flow::Offramp),
        );
    }
    // The generator must actually reach the success path sometimes.
    assert!(accepted > 0);
}

/// Random JSON text (with duplicate keys possible) from a vocabulary of our field names.
fn random_json(rng: &mut Rng, depth: u32, out: &mut String) {
    const KEYS: &[&str] = &[
        "addresses",
        "address",
        "blockchains",
        "assets",
        "partnerUserRef",
        "partnerUserId",
        "redirectUrl",
        "presetFiatAmount",
        "disableEdit",
        "defaultNetwork",
        "x",
    ];
    const STRINGS: &[&str] = &[
        EVM,
        SOL,
        BTC,
        "base",
        "solana",
        "USDC",
        "10",
        "https://app.com/",
        "myapp://cb",
        "",
        "é\\u0000",
        "\\ud800",
        "true",
        "a\\\"b",
    ];
    let choice = if depth == 0 {
        rng.below(4)
    } else {
        rng.below(7)
    };
    match choice {
        0 => out.push_str("null"),
        1 => out.push_str(rng.pick(&["true", "false"])),
        2 => out.push_str(rng.pick(&[
            "0",
            "-1",
            "10.5",
            "1e400",
            "1e-7",
            "18446744073709551616",
            "7",
        ])),
        3 => {
            out.push('"');
            out.push_str(rng.pick(STRINGS));
            out.push('"');
        }
        4 => {
            out.push('[');
            for i in 0..rng.below(4) {
                if i > 0 {
                    out.push(',');
                }
                random_json(rng, depth - 1, out);
            }
            out.push(']');
        }
        _ => {
            out.push('{');
            for i in 0..rng.below(5) {
                if i > 0 {
                    out.push(',');
                }
                out.push('"');
                out.push_str(rng.pick(KEYS));
                out.push_str("\":");
                random_json(rng, depth - 1, out);
            }
            out.push('}');
        }
    }
}

/// A well-formed request to mutate, so mutations land near the success path.
fn valid_json(rng: &mut Rng) -> String {
    let addr = rng.pick(&[EVM, EVM2]);
    format!(
        r#"{{"addresses":[{{"address":"{addr}","blockchains":["base"]}}],"assets":["USDC"],
            "partnerUserRef":"u1","redirectUrl":"https://app.com/","presetFiatAmount":{}}}"#,
        rng.pick(&["10", "\"5.5\"", "true", "null"])
    )
}

#[test]
fn fuzz_json() {
    let cfg = Cfg::new();
    let mut rng = Rng(0x5eed_0002);
    let mut accepted = 0;
    for i in 0..4000 {
        let mut body = String::new();
        if i % 2 == 0 {
            random_json(&mut rng, 4, &mut body);
        } else {
            body = valid_json(&mut rng);
        }
        let mut bytes = body.into_bytes();
        // Mutate a third of the cases at the byte level (may break UTF-8 on purpose).
        if i % 3 == 0 && !bytes.is_empty() {
            for _ in 0..=rng.below(3) {
                let at = rng.below(bytes.len());
                match rng.below(3) {
                    0 => bytes[at] = rng.next() as u8,
                    1 => bytes.truncate(at),
                    _ => bytes.insert(at, *b"{}[],:\"\\0x".get(rng.below(11)).unwrap_or(&b'x')),
                }
                if bytes.is_empty() {
                    break;
                }
            }
        }
        for flow in [Flow::Onramp, Flow::Offramp] {
            let rules = cfg.rules(flow);
            if let Ok(req) = from_json(&bytes, &rules) {
                accepted += 1;
                check_success_invariants(&req, &rules);
            }
            if let Ok(req) = from_upstream_context(&bytes, ClientInput::Json(&bytes), &rules) {
                check_success_invariants(&req, &rules);
            }
        }
    }
    assert!(accepted > 0);
}

#[test]
fn fuzz_redirect_urls() {
    const PARTS: &[&str] = &[
        "https://",
        "http://",
        "myapp://",
        "javascript:",
        "data:",
        "//",
        "app.com",
        "*.",
        "a.",
        "app.com.",
        "evil.net",
        "@",
        ":",
        "443",
        "8443",
        "/",
        "cb",
        "?",
        "#",
        "%2e",
        "%40",
        "\\",
        "[::1]",
        "127.0.0.1",
        "xn--",
        "bücher",
        "\u{430}",
        "\t",
        " ",
        "..",
        "*",
        "user:pw",
    ];
    let rules = Cfg::new().allow;
    let mut rng = Rng(0x5eed_0003);
    for _ in 0..5000 {
        let s: String = (0..rng.below(8)).map(|_| rng.pick(PARTS)).collect();
        if let Ok(rule) = RedirectRule::parse(&s) {
            // A parsed rule matches its own canonical form where it has one.
            let _ = rule.matches(&url("https://app.com/"));
        }
        if let Ok(normalised) = redirect::check_redirect_url(&s, &rules) {
            // What we forward is stable and still allowed when parsed again.
            let again = redirect::check_redirect_url(&normalised, &rules);
            assert_eq!(again.as_deref(), Ok(normalised.as_str()), "{s:?}");
            let u = url(&normalised);
            assert!(u.username().is_empty() && u.password().is_none());
        }
    }
}

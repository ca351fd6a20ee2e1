//! The browser's input to the onramp/offramp routes: parsing and validation, and the
//! `Location` the gateway redirects to. Pure functions, no I/O.
//!
//! SPEC.md ("The routes it answers itself") is the contract. Where it is silent, the rules
//! below are the ones chosen, strict on purpose: a 400 that names the field is cheap, a
//! guessed request reaching Coinbase with a user's funds is not.
//!
//! # Fields
//!
//! - Query string (GET) and `application/x-www-form-urlencoded` body (POST):
//!   `address=A&blockchains=base,ethereum[&assets=USDC,ETH][&<presets>]` — one address for
//!   the listed blockchains.
//! - JSON body: `{"addresses":[{"address":A,"blockchains":["base"]}],"assets":["USDC"],
//!   <presets>}`; presets may be JSON strings, numbers or booleans (`null` = absent).
//!   Lists are JSON arrays here, never comma strings.
//! - Parameter names are case-sensitive. Unknown parameters are silently dropped (so a
//!   client can never inject `sessionToken`, `appId` or `addresses` into the Location).
//! - A known parameter given twice (`a=1&a=2`, a duplicated JSON key at any depth, or both
//!   `partnerUserRef` and its older name `partnerUserId`) is a 400: never guess which one
//!   was meant.
//! - Values are not trimmed; whitespace fails the charset checks. An *empty* value of an
//!   optional parameter counts as absent (HTML forms send empty inputs); an empty
//!   `address` / `blockchains` counts as missing. Empty items in a comma list are a 400.
//!
//! # Limits and checks
//!
//! - At most [`MAX_ADDRESSES`] address entries (JSON), [`MAX_BLOCKCHAINS_PER_ADDRESS`]
//!   blockchains per entry, [`MAX_ASSETS`] assets.
//! - Blockchains: compared and sent lowercase; each must be in `onramp.blockchains`; listed
//!   at most once per entry, and a blockchain may have only one address across entries (the
//!   CDP docs: "a single address for each network"). The same address in two entries is a
//!   400 (list all its blockchains in one entry).
//! - Address: well-formed for *every* blockchain it is given for (see [`super::address`]).
//! - Assets: tickers or asset UUIDs, `[A-Za-z0-9-]`, 1..=64 characters, each at most once
//!   (case-insensitive). If `onramp.assets` is set, requested assets must be among them
//!   (case-insensitive; the configured spelling is sent), and a request without assets
//!   gets all of `onramp.assets`.
//!
//! # Preset parameters (forwarded in the Location; everything else is dropped)
//!
//! | param | rule |
//! |---|---|
//! | `defaultNetwork` | lowercase; must be one of the request's blockchains |
//! | `defaultAsset` | `[A-Za-z0-9-]`, ≤ 64; if the request has assets, one of them (sent with their spelling) |
//! | `presetFiatAmount`, `presetCryptoAmount` | positive plain decimal: `0` or `[1-9][0-9]*`, up to 15 digits, optional `.` + 1..=18 digits, not zero; no sign, exponent or separators |
//! | `fiatCurrency` | 3 ASCII letters, sent uppercase |
//! | `defaultPaymentMethod`, `defaultCashoutMethod` | `[A-Za-z0-9_]`, 1..=64 (e.g. `CARD`, `ACH_BANK_ACCOUNT`) |
//! | `defaultExperience` | `buy` or `send` |
//! | `handlingRequestedUrls`, `disableEdit` | `true` or `false` |
//! | `quoteId` | `[A-Za-z0-9_-]`, 1..=128 |
//! | `partnerUserRef` (alias `partnerUserId`, sent as `partnerUserRef`) | 1..=49 characters of `[A-Za-z0-9-_.:@\|+]` |
//! | `redirectUrl` | must match `offramp.redirect_url_allowlist` (see [`super::redirect`]); the normalised URL is sent |
//!
//! `defaultCashoutMethod` and `disableEdit` exist only for offramp (dropped on onramp).
//! Offramp requires `partnerUserRef` and `redirectUrl`; with an empty allowlist no
//! `redirectUrl` is accepted, so offramp does not work until the allowlist is configured.
//! JSON numbers are forwarded in `serde_json`'s rendering (`10.5`, `100`, `1e-7`), so very
//! small or large ones fail the decimal rule; send strings for exact amounts.
//!
//! # `addresses.source = "upstream"`
//!
//! The app's context answer supplies `addresses`, `assets` and optionally `partnerUserRef`;
//! the client's `address`, `blockchains`, `addresses` and `assets` are ignored (not even
//! checked for duplicates). The client's presets still apply. A `partnerUserRef` from the
//! app overrides the client's (the app knows who the user is; the client could lie). Errors
//! in the context carry [`ErrorOrigin::Upstream`]: the app answered garbage, which the
//! route should report as `502`, not blame the browser with a `400`.
//!
//! # Location
//!
//! `build_location` never includes the address: only `sessionToken` and the validated
//! presets. Note that an app *may* choose an address as its `partnerUserRef` (the Coinbase
//! demo does); that is the app's decision and is not policed here.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Serialize;
use url::Url;

use super::address;
use super::redirect;
pub use super::redirect::RedirectRule;

/// Most address entries in one request (JSON form and upstream context).
pub const MAX_ADDRESSES: usize = 10;
/// Most blockchains listed for one address.
pub const MAX_BLOCKCHAINS_PER_ADDRESS: usize = 16;
/// Most assets in one request.
pub const MAX_ASSETS: usize = 20;
/// Longest asset ticker or UUID.
pub const MAX_ASSET_LEN: usize = 64;
/// Longest `partnerUserRef`: Coinbase requires "less than 50 chars".
pub const MAX_PARTNER_USER_REF_LEN: usize = 49;

/// Which route is being served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Onramp,
    Offramp,
}

impl Flow {
    /// `"onramp"` or `"offramp"` (metrics labels, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            Flow::Onramp => "onramp",
            Flow::Offramp => "offramp",
        }
    }
}

/// What the configuration allows, borrowed from it per request.
#[derive(Clone, Copy, Debug)]
pub struct Rules<'a> {
    pub flow: Flow,
    /// `onramp.blockchains`: the allowed blockchains (compared case-insensitively).
    pub blockchains: &'a [String],
    /// `onramp.assets`: if non-empty, the only assets allowed, and the default.
    pub assets: &'a [String],
    /// Parsed `offramp.redirect_url_allowlist` (used by both flows).
    pub redirect_allowlist: &'a [RedirectRule],
}

/// One `addresses[]` item of the CDP token request; serialises to exactly the CDP shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AddressEntry {
    pub address: String,
    /// Lowercase, each in the allowlist, valid for `address`.
    pub blockchains: Vec<String>,
}

/// A validated request: what to send to the token API, and what to put in the Location.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MintRequest {
    /// At least one entry.
    pub addresses: Vec<AddressEntry>,
    /// For the CDP token API; omit the `assets` key when empty.
    pub assets: Vec<String>,
    /// Allowed preset params with validated values, in the fixed order of the preset
    /// table, for the Location. Never contains an address field.
    pub presets: Vec<(String, String)>,
}

/// Whose input was wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorOrigin {
    /// The browser's request: answer `400`.
    Client,
    /// The app's `addresses.source = "upstream"` context answer: answer `502`.
    Upstream,
}

/// Invalid input. `Display` is `"{field}: {reason}"`; neither part ever contains raw
/// client input beyond short values that passed a conservative charset check, so it is
/// safe to log, though HTML output must still be escaped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    /// The parameter, e.g. `address`, `blockchains`, `addresses[1].address`,
    /// `redirectUrl`, or `body` when the body itself is unreadable.
    pub field: String,
    pub reason: String,
    pub origin: ErrorOrigin,
}

/// Where the client's preset params come from when the addresses come from upstream.
#[derive(Clone, Copy, Debug)]
pub enum ClientInput<'b> {
    /// The query string, without the leading `?`.
    Query(&'b str),
    /// An `application/x-www-form-urlencoded` body.
    Form(&'b [u8]),
    /// A JSON body.
    Json(&'b [u8]),
    /// No client parameters at all.
    None,
}

/// `GET {path}?address=..&blockchains=..[&assets=..][&presets]`. `query` is the part after
/// `?` (a leading `?` is tolerated).
pub fn from_query(query: &str, rules: &Rules) -> Result<MintRequest, ValidationError> {
    let query = query.strip_prefix('?').unwrap_or(query);
    finish(raw_from_pairs(query, rules.flow, Mode::Full)?, rules)
}

/// `POST` with an `application/x-www-form-urlencoded` body; same fields as the query.
pub fn from_form(body: &[u8], rules: &Rules) -> Result<MintRequest, ValidationError> {
    finish(raw_from_pairs(utf8(body)?, rules.flow, Mode::Full)?, rules)
}

/// `POST` with a JSON body `{"addresses":[..],"assets":[..], <presets>}`.
pub fn from_json(body: &[u8], rules: &Rules) -> Result<MintRequest, ValidationError> {
    finish(raw_from_json(body, rules.flow, Mode::Full)?, rules)
}

/// `addresses.source = "upstream"`: addresses, assets and `partnerUserRef` from the app's
/// context JSON `{"addresses":[..],"assets":[..],"partnerUserRef":".."}`, presets from the
/// client's request. Errors in the context have [`ErrorOrigin::Upstream`].
pub fn from_upstream_context(
    context_json: &[u8],
    client_presets_from: ClientInput,
    rules: &Rules,
) -> Result<MintRequest, ValidationError> {
    let upstream = |mut e: ValidationError| {
        e.origin = ErrorOrigin::Upstream;
        e
    };
    let context = raw_from_json(context_json, rules.flow, Mode::Full).map_err(upstream)?;
    let addresses =
        validate_addresses(context.addresses, context.addresses_field, rules).map_err(upstream)?;
    let assets = validate_assets(context.assets, rules).map_err(upstream)?;
    let partner_ref = match &context.presets[PARTNER_USER_REF] {
        Some(v) if !v.is_empty() => Some(
            check_partner_user_ref(v)
                .map_err(|r| client_error(PRESETS[PARTNER_USER_REF].name, r))
                .map_err(upstream)?,
        ),
        _ => None,
    };

    let mut client = match client_presets_from {
        ClientInput::Query(q) => raw_from_pairs(
            q.strip_prefix('?').unwrap_or(q),
            rules.flow,
            Mode::PresetsOnly,
        )?,
        ClientInput::Form(body) => raw_from_pairs(utf8(body)?, rules.flow, Mode::PresetsOnly)?,
        ClientInput::Json(body) => raw_from_json(body, rules.flow, Mode::PresetsOnly)?,
        ClientInput::None => RawInput::new("addresses"),
    };
    if partner_ref.is_some() {
        client.presets[PARTNER_USER_REF] = partner_ref;
    }
    let presets = validate_presets(client.presets, &addresses, &assets, rules)?;
    Ok(MintRequest {
        addresses,
        assets,
        presets,
    })
}

/// The redirect target: `base` with `sessionToken` and the presets appended to its query
/// (form-urlencoded). A query already on `base` is kept as written: a preset it already
/// names is not appended again (the operator's fixed value wins), and a stale
/// `sessionToken` on it is removed. The address is never included.
pub fn build_location(base: &Url, session_token: &str, req: &MintRequest) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut base_names: HashSet<String> = HashSet::new();
    for segment in base.query().unwrap_or("").split('&') {
        if segment.is_empty() {
            continue;
        }
        let name = form_urlencoded::parse(segment.as_bytes())
            .next()
            .map(|(k, _)| k.into_owned())
            .unwrap_or_default();
        if name == "sessionToken" {
            continue;
        }
        kept.push(segment);
        base_names.insert(name);
    }
    let mut added = form_urlencoded::Serializer::new(String::new());
    added.append_pair("sessionToken", session_token);
    for (name, value) in &req.presets {
        if !base_names.contains(name) {
            added.append_pair(name, value);
        }
    }
    let added = added.finish();
    kept.push(&added);
    let mut url = base.clone();
    url.set_query(Some(&kept.join("&")));
    url.into()
}

// ---------------------------------------------------------------------------------------
// Preset table

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PresetKind {
    Network,
    Asset,
    Amount,
    Currency,
    Method,
    Experience,
    Bool,
    QuoteId,
    PartnerRef,
    RedirectUrl,
}

struct PresetSpec {
    name: &'static str,
    kind: PresetKind,
    offramp_only: bool,
}

const fn preset(name: &'static str, kind: PresetKind, offramp_only: bool) -> PresetSpec {
    PresetSpec {
        name,
        kind,
        offramp_only,
    }
}

/// The forwarded params, in Location order (SPEC.md's order, offramp extras last).
const PRESETS: [PresetSpec; 13] = [
    preset("defaultNetwork", PresetKind::Network, false),
    preset("defaultAsset", PresetKind::Asset, false),
    preset("presetFiatAmount", PresetKind::Amount, false),
    preset("presetCryptoAmount", PresetKind::Amount, false),
    preset("fiatCurrency", PresetKind::Currency, false),
    preset("defaultPaymentMethod", PresetKind::Method, false),
    preset("defaultExperience", PresetKind::Experience, false),
    preset("handlingRequestedUrls", PresetKind::Bool, false),
    preset("quoteId", PresetKind::QuoteId, false),
    preset("partnerUserRef", PresetKind::PartnerRef, false),
    preset("redirectUrl", PresetKind::RedirectUrl, false),
    preset("defaultCashoutMethod", PresetKind::Method, true),
    preset("disableEdit", PresetKind::Bool, true),
];
const PARTNER_USER_REF: usize = 9;
const REDIRECT_URL: usize = 10;
/// The older name of `partnerUserRef`, still used by Coinbase's demo and cbpay-js.
const PARTNER_USER_ID: &str = "partnerUserId";

/// Names of the preset params forwarded for `flow`, in Location order (for docs/tests).
pub fn preset_names(flow: Flow) -> impl Iterator<Item = &'static str> {
    PRESETS
        .iter()
        .filter(move |p| flow == Flow::Offramp || !p.offramp_only)
        .map(|p| p.name)
}

/// Slot of a client parameter name in [`PRESETS`] for `flow`, with the alias mapped.
fn preset_slot(name: &str, flow: Flow) -> Option<usize> {
    let name = if name == PARTNER_USER_ID {
        PRESETS[PARTNER_USER_REF].name
    } else {
        name
    };
    PRESETS
        .iter()
        .position(|p| p.name == name && (flow == Flow::Offramp || !p.offramp_only))
}

// ---------------------------------------------------------------------------------------
// Raw input: the three encodings brought to one shape, before validation

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Address fields and presets.
    Full,
    /// Presets only; address fields are ignored like unknown params (upstream source).
    PresetsOnly,
}

struct RawAddress {
    address: Option<String>,
    address_field: String,
    blockchains: Option<Vec<String>>,
    blockchains_field: String,
}

struct RawInput {
    /// `None`: the client sent no address fields.
    addresses: Option<Vec<RawAddress>>,
    /// Field to blame when `addresses` is `None`.
    addresses_field: &'static str,
    assets: Option<Vec<String>>,
    /// Indexed like [`PRESETS`]; empty strings are kept here and mean "absent".
    presets: [Option<String>; PRESETS.len()],
}

impl RawInput {
    fn new(addresses_field: &'static str) -> Self {
        RawInput {
            addresses: None,
            addresses_field,
            assets: None,
            presets: std::array::from_fn(|_| None),
        }
    }
}

fn client_error(field: impl Into<String>, reason: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        reason: reason.into(),
        origin: ErrorOrigin::Client,
    }
}

fn duplicate(field: &str) -> ValidationError {
    let reason = if field == PRESETS[PARTNER_USER_REF].name {
        "given more than once (partnerUserId is the older name of partnerUserRef)"
    } else {
        "given more than once"
    };
    client_error(field, reason)
}

fn utf8(body: &[u8]) -> Result<&str, ValidationError> {
    std::str::from_utf8(body).map_err(|_| client_error("body", "not valid UTF-8"))
}

/// Query string or form body. Percent-decoding is lossy (invalid UTF-8 escapes become
/// U+FFFD), which every charset check below then refuses.
fn raw_from_pairs(text: &str, flow: Flow, mode: Mode) -> Result<RawInput, ValidationError> {
    let mut raw = RawInput::new("address");
    let mut address: Option<String> = None;
    let mut blockchains: Option<String> = None;
    let mut assets: Option<String> = None;
    for (key, value) in form_urlencoded::parse(text.as_bytes()) {
        let (slot, field) = match (mode, key.as_ref()) {
            (Mode::Full, "address") => (&mut address, "address"),
            (Mode::Full, "blockchains") => (&mut blockchains, "blockchains"),
            (Mode::Full, "assets") => (&mut assets, "assets"),
            (_, name) => match preset_slot(name, flow) {
                Some(i) => (&mut raw.presets[i], PRESETS[i].name),
                None => continue,
            },
        };
        if slot.is_some() {
            return Err(duplicate(field));
        }
        *slot = Some(value.into_owned());
    }
    if mode == Mode::Full {
        let blockchains = match blockchains.filter(|b| !b.is_empty()) {
            Some(list) => Some(split_list(
                &list,
                "blockchains",
                MAX_BLOCKCHAINS_PER_ADDRESS,
            )?),
            None => None,
        };
        raw.addresses = Some(vec![RawAddress {
            address: address.filter(|a| !a.is_empty()),
            address_field: "address".into(),
            blockchains,
            blockchains_field: "blockchains".into(),
        }]);
        raw.assets = match assets.filter(|a| !a.is_empty()) {
            Some(list) => Some(split_list(&list, "assets", MAX_ASSETS)?),
            None => None,
        };
    }
    Ok(raw)
}

fn split_list(list: &str, field: &str, max: usize) -> Result<Vec<String>, ValidationError> {
    let mut out = Vec::new();
    for item in list.split(',') {
        if item.is_empty() {
            return Err(client_error(
                field,
                "empty item in the comma-separated list",
            ));
        }
        if out.len() == max {
            return Err(client_error(field, format!("more than {max} items")));
        }
        out.push(item.to_owned());
    }
    Ok(out)
}

fn raw_from_json(body: &[u8], flow: Flow, mode: Mode) -> Result<RawInput, ValidationError> {
    let text = utf8(body)?;
    let value: JsonValue = serde_json::from_str(text)
        .map_err(|e| client_error("body", format!("not valid JSON: {e}")))?;
    let JsonValue::Object(fields) = value else {
        return Err(client_error("body", "must be a JSON object"));
    };
    let mut raw = RawInput::new("addresses");
    let mut seen = [false; PRESETS.len()];
    for (key, value) in fields {
        match (mode, key.as_str()) {
            (Mode::Full, "addresses") => raw.addresses = json_addresses(value)?,
            (Mode::Full, "assets") => raw.assets = json_string_list(value, "assets", MAX_ASSETS)?,
            (_, name) => {
                let Some(i) = preset_slot(name, flow) else {
                    continue;
                };
                // Only partnerUserRef/partnerUserId can collide here: the JSON parser
                // already refused literally repeated keys.
                if std::mem::replace(&mut seen[i], true) {
                    return Err(duplicate(PRESETS[i].name));
                }
                raw.presets[i] = json_scalar(value, PRESETS[i].name)?;
            }
        }
    }
    Ok(raw)
}

fn json_addresses(value: JsonValue) -> Result<Option<Vec<RawAddress>>, ValidationError> {
    let items = match value {
        JsonValue::Null => return Ok(None),
        JsonValue::Array(items) => items,
        _ => {
            return Err(client_error(
                "addresses",
                "must be an array of {\"address\", \"blockchains\"} objects",
            ))
        }
    };
    if items.len() > MAX_ADDRESSES {
        return Err(client_error(
            "addresses",
            format!("more than {MAX_ADDRESSES} addresses"),
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let JsonValue::Object(fields) = item else {
            return Err(client_error(
                format!("addresses[{i}]"),
                "must be an object with address and blockchains",
            ));
        };
        let address_field = format!("addresses[{i}].address");
        let blockchains_field = format!("addresses[{i}].blockchains");
        let mut address = None;
        let mut blockchains = None;
        for (key, value) in fields {
            match key.as_str() {
                "address" => {
                    address = match value {
                        JsonValue::String(s) if !s.is_empty() => Some(s),
                        JsonValue::String(_) | JsonValue::Null => None,
                        _ => return Err(client_error(address_field, "must be a string")),
                    }
                }
                "blockchains" => {
                    blockchains =
                        json_string_list(value, &blockchains_field, MAX_BLOCKCHAINS_PER_ADDRESS)?
                }
                _ => {}
            }
        }
        out.push(RawAddress {
            address,
            address_field,
            blockchains,
            blockchains_field,
        });
    }
    Ok(Some(out))
}

fn json_string_list(
    value: JsonValue,
    field: &str,
    max: usize,
) -> Result<Option<Vec<String>>, ValidationError> {
    let items = match value {
        JsonValue::Null => return Ok(None),
        JsonValue::Array(items) => items,
        _ => return Err(client_error(field, "must be an array of strings")),
    };
    if items.len() > max {
        return Err(client_error(field, format!("more than {max} items")));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(j, item)| match item {
            JsonValue::String(s) => Ok(s),
            _ => Err(client_error(format!("{field}[{j}]"), "must be a string")),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// A preset value: strings as they are, numbers and booleans as their JSON text.
fn json_scalar(value: JsonValue, field: &str) -> Result<Option<String>, ValidationError> {
    match value {
        JsonValue::Null => Ok(None),
        JsonValue::Bool(b) => Ok(Some(b.to_string())),
        JsonValue::Number(n) => Ok(Some(n.to_string())),
        JsonValue::String(s) => Ok(Some(s)),
        JsonValue::Array(_) | JsonValue::Object(_) => {
            Err(client_error(field, "must be a string, number or boolean"))
        }
    }
}

/// JSON value that refuses duplicate object keys (serde_json's own `Value` silently keeps
/// the last one) and keeps key order. Depth is bounded by serde_json's recursion limit.
enum JsonValue {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<JsonValue>),
    Object(Vec<(String, JsonValue)>),
}

impl<'de> Deserialize<'de> for JsonValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonValueVisitor)
    }
}

struct JsonValueVisitor;

impl<'de> Visitor<'de> for JsonValueVisitor {
    type Value = JsonValue;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<JsonValue, E> {
        Ok(JsonValue::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<JsonValue, E> {
        Ok(JsonValue::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<JsonValue, E> {
        Ok(JsonValue::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<JsonValue, E> {
        serde_json::Number::from_f64(v)
            .map(JsonValue::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E>(self, v: &str) -> Result<JsonValue, E> {
        Ok(JsonValue::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<JsonValue, E> {
        Ok(JsonValue::String(v))
    }
    fn visit_unit<E>(self) -> Result<JsonValue, E> {
        Ok(JsonValue::Null)
    }
    fn visit_none<E>(self) -> Result<JsonValue, E> {
        Ok(JsonValue::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<JsonValue, D::Error> {
        JsonValue::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<JsonValue, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(JsonValue::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonValue, A::Error> {
        let mut fields: Vec<(String, JsonValue)> = Vec::new();
        let mut keys: HashSet<String> = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !keys.insert(key.clone()) {
                return Err(de::Error::custom(format!("duplicate key {}", shown(&key))));
            }
            let value = map.next_value()?;
            fields.push((key, value));
        }
        Ok(JsonValue::Object(fields))
    }
}

/// A client value quoted for an error message if it is short and harmless, else a
/// placeholder: reasons end up in logs and HTML.
fn shown(value: &str) -> String {
    let harmless = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if harmless {
        format!("\"{value}\"")
    } else {
        "(value not shown)".to_owned()
    }
}

// ---------------------------------------------------------------------------------------
// Validation

fn finish(raw: RawInput, rules: &Rules) -> Result<MintRequest, ValidationError> {
    let addresses = validate_addresses(raw.addresses, raw.addresses_field, rules)?;
    let assets = validate_assets(raw.assets, rules)?;
    let presets = validate_presets(raw.presets, &addresses, &assets, rules)?;
    Ok(MintRequest {
        addresses,
        assets,
        presets,
    })
}

fn validate_addresses(
    raw: Option<Vec<RawAddress>>,
    missing_field: &'static str,
    rules: &Rules,
) -> Result<Vec<AddressEntry>, ValidationError> {
    let Some(raw) = raw else {
        return Err(client_error(missing_field, "required"));
    };
    if raw.is_empty() {
        return Err(client_error(
            missing_field,
            "at least one address is required",
        ));
    }
    let mut out: Vec<AddressEntry> = Vec::with_capacity(raw.len());
    for entry in raw {
        let Some(address) = entry.address else {
            return Err(client_error(entry.address_field, "required"));
        };
        let chains = match entry.blockchains {
            Some(c) if !c.is_empty() => c,
            _ => {
                return Err(client_error(
                    entry.blockchains_field,
                    "required: at least one blockchain",
                ))
            }
        };
        if chains.len() > MAX_BLOCKCHAINS_PER_ADDRESS {
            return Err(client_error(
                entry.blockchains_field,
                format!("more than {MAX_BLOCKCHAINS_PER_ADDRESS} items"),
            ));
        }
        let mut blockchains: Vec<String> = Vec::with_capacity(chains.len());
        for chain in chains {
            let chain = chain.to_ascii_lowercase();
            let field = &entry.blockchains_field;
            if !rules
                .blockchains
                .iter()
                .any(|a| a.eq_ignore_ascii_case(&chain))
            {
                return Err(client_error(
                    field,
                    format!(
                        "{} is not allowed (allowed: {})",
                        shown(&chain),
                        rules.blockchains.join(", ")
                    ),
                ));
            }
            if blockchains.contains(&chain) {
                return Err(client_error(field, format!("\"{chain}\" is listed twice")));
            }
            if out.iter().any(|e| e.blockchains.contains(&chain)) {
                return Err(client_error(
                    field,
                    format!("\"{chain}\" already has an address (one address per blockchain)"),
                ));
            }
            address::check(&address, &chain).map_err(|reason| {
                client_error(&entry.address_field, format!("{reason}, for \"{chain}\""))
            })?;
            blockchains.push(chain);
        }
        if out.iter().any(|e| e.address == address) {
            return Err(client_error(
                entry.address_field,
                "given twice; list all its blockchains in one entry",
            ));
        }
        out.push(AddressEntry {
            address,
            blockchains,
        });
    }
    Ok(out)
}

fn is_asset(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ASSET_LEN
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn validate_assets(
    raw: Option<Vec<String>>,
    rules: &Rules,
) -> Result<Vec<String>, ValidationError> {
    let requested = raw.unwrap_or_default();
    if requested.len() > MAX_ASSETS {
        return Err(client_error(
            "assets",
            format!("more than {MAX_ASSETS} items"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(requested.len());
    for asset in requested {
        if !is_asset(&asset) {
            return Err(client_error(
                "assets",
                format!(
                    "each asset must be a ticker or UUID: letters, digits and '-', at most {MAX_ASSET_LEN} characters"
                ),
            ));
        }
        let asset = if rules.assets.is_empty() {
            asset
        } else {
            match rules.assets.iter().find(|a| a.eq_ignore_ascii_case(&asset)) {
                Some(configured) => configured.clone(),
                None => {
                    return Err(client_error(
                        "assets",
                        format!(
                            "{} is not allowed (allowed: {})",
                            shown(&asset),
                            rules.assets.join(", ")
                        ),
                    ))
                }
            }
        };
        if out.iter().any(|a| a.eq_ignore_ascii_case(&asset)) {
            return Err(client_error(
                "assets",
                format!("\"{asset}\" is listed twice"),
            ));
        }
        out.push(asset);
    }
    if out.is_empty() {
        out = rules.assets.to_vec();
    }
    Ok(out)
}

fn validate_presets(
    raw: [Option<String>; PRESETS.len()],
    addresses: &[AddressEntry],
    assets: &[String],
    rules: &Rules,
) -> Result<Vec<(String, String)>, ValidationError> {
    let mut out = Vec::new();
    for (spec, value) in PRESETS.iter().zip(raw) {
        let Some(value) = value.filter(|v| !v.is_empty()) else {
            continue;
        };
        if spec.offramp_only && rules.flow == Flow::Onramp {
            continue;
        }
        let value = check_preset(spec.kind, &value, addresses, assets, rules)
            .map_err(|reason| client_error(spec.name, reason))?;
        out.push((spec.name.to_owned(), value));
    }
    if rules.flow == Flow::Offramp {
        for required in [PARTNER_USER_REF, REDIRECT_URL] {
            let name = PRESETS[required].name;
            if !out.iter().any(|(n, _)| n == name) {
                return Err(client_error(name, "required for offramp"));
            }
        }
    }
    Ok(out)
}

/// Validates one preset value; returns the value to forward, or the reason it is refused.
fn check_preset(
    kind: PresetKind,
    value: &str,
    addresses: &[AddressEntry],
    assets: &[String],
    rules: &Rules,
) -> Result<String, String> {
    match kind {
        PresetKind::Network => {
            let chain = value.to_ascii_lowercase();
            let requested: Vec<&str> = addresses
                .iter()
                .flat_map(|e| e.blockchains.iter().map(String::as_str))
                .collect();
            if requested.contains(&chain.as_str()) {
                Ok(chain)
            } else {
                Err(format!(
                    "must be one of the requested blockchains ({})",
                    requested.join(", ")
                ))
            }
        }
        PresetKind::Asset => {
            if !is_asset(value) {
                return Err(format!(
                    "must be a ticker or UUID: letters, digits and '-', at most {MAX_ASSET_LEN} characters"
                ));
            }
            if assets.is_empty() {
                return Ok(value.to_owned());
            }
            assets
                .iter()
                .find(|a| a.eq_ignore_ascii_case(value))
                .cloned()
                .ok_or_else(|| {
                    format!(
                        "must be one of the requested assets ({})",
                        assets.join(", ")
                    )
                })
        }
        PresetKind::Amount => {
            if is_positive_decimal(value) {
                Ok(value.to_owned())
            } else {
                Err("must be a positive decimal number like 25 or 0.05".into())
            }
        }
        PresetKind::Currency => {
            if value.len() == 3 && value.bytes().all(|b| b.is_ascii_alphabetic()) {
                Ok(value.to_ascii_uppercase())
            } else {
                Err("must be a 3-letter currency code like USD".into())
            }
        }
        PresetKind::Method => {
            let ok = (1..=64).contains(&value.len())
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if ok {
                Ok(value.to_owned())
            } else {
                Err("must be a method name like CARD (letters, digits and '_')".into())
            }
        }
        PresetKind::Experience => match value {
            "buy" | "send" => Ok(value.to_owned()),
            _ => Err("must be \"buy\" or \"send\"".into()),
        },
        PresetKind::Bool => match value {
            "true" | "false" => Ok(value.to_owned()),
            _ => Err("must be true or false".into()),
        },
        PresetKind::QuoteId => {
            let ok = (1..=128).contains(&value.len())
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
            if ok {
                Ok(value.to_owned())
            } else {
                Err("must be a quote id (letters, digits, '-' and '_')".into())
            }
        }
        PresetKind::PartnerRef => check_partner_user_ref(value),
        PresetKind::RedirectUrl => redirect::check_redirect_url(value, rules.redirect_allowlist),
    }
}

fn check_partner_user_ref(value: &str) -> Result<String, String> {
    let ok = (1..=MAX_PARTNER_USER_REF_LEN).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@|+".contains(&b));
    if ok {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "must be 1 to {MAX_PARTNER_USER_REF_LEN} characters of letters, digits and - _ . : @ | +"
        ))
    }
}

/// `0` or `[1-9][0-9]*` (at most 15 digits), optionally `.` and 1..=18 digits, and not zero.
fn is_positive_decimal(s: &str) -> bool {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || int.len() > 15 || !digits(int) || (int.len() > 1 && int.starts_with('0')) {
        return false;
    }
    if let Some(f) = frac {
        if f.is_empty() || f.len() > 18 || !digits(f) {
            return false;
        }
    }
    s.bytes().any(|b| matches!(b, b'1'..=b'9'))
}

#[cfg(test)]
mod tests;

//! `onramp-gateway webhooks subscribe --url URL` and `webhooks list`: the CDP webhook
//! subscription API (`{platform_base}/v2/data/webhooks/subscriptions`) through the one CDP
//! client. `subscribe` creates a subscription for the eight transaction events and prints
//! its id and secret once, on stdout; nothing here logs, and `list` never prints a secret.

use std::process::ExitCode;
use std::sync::Arc;

use serde_json::{json, Value};

use super::EVENT_TYPES;
use crate::cdp::client::CdpClient;
use crate::cdp::key::CdpKey;
use crate::config::Settings;

/// Under `cdp.platform_base` (which ends in `/`).
pub const SUBSCRIPTIONS_PATH: &str = "v2/data/webhooks/subscriptions";
/// Pages `list` follows at most (100 subscriptions each).
const MAX_PAGES: usize = 20;

#[derive(clap::Subcommand, Debug)]
pub enum WebhooksCommand {
    /// Subscribe URL (https) to the onramp/offramp transaction events; prints the secret once.
    Subscribe {
        /// Where Coinbase delivers: https://<your host><webhooks.path>.
        #[arg(long)]
        url: String,
        /// Shown in the CDP portal.
        #[arg(long, default_value = "onramp-gateway transaction events")]
        description: String,
    },
    /// List the subscriptions (id, URL, enabled, event types; never the secret).
    List,
}

/// The create request: the eight event types, `isEnabled: true`.
pub fn subscribe_body(url: &str, description: &str) -> Result<Value, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("--url: invalid URL: {e}"))?;
    if parsed.scheme() != "https" || parsed.host_str().is_none() {
        return Err("--url: Coinbase delivers to https:// URLs only".into());
    }
    Ok(json!({
        "description": description,
        "eventTypes": EVENT_TYPES,
        "target": {"url": parsed.as_str()},
        "isEnabled": true,
    }))
}

/// One line per subscription: `id  url  enabled=..  events=a,b`.
pub fn list_lines(page: &Value) -> Vec<String> {
    let items = page
        .get("subscriptions")
        .or_else(|| page.get("data"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    items
        .iter()
        .map(|s| {
            let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("-").to_string();
            let events: Vec<&str> = s
                .get("eventTypes")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            format!(
                "{}  {}  enabled={}  events={}",
                text(s.get("subscriptionId")),
                text(s.get("target").and_then(|t| t.get("url"))),
                s.get("isEnabled").and_then(Value::as_bool).unwrap_or(false),
                events.join(",")
            )
        })
        .collect()
}

pub fn run(settings: &Settings, key: CdpKey, command: WebhooksCommand) -> ExitCode {
    let cdp = match CdpClient::new(
        &settings.cdp_api_base,
        Arc::new(key),
        settings.cdp_timeout(),
        settings.cdp_ca.as_ref(),
    ) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    let url = match settings.cdp_platform_base.join(SUBSCRIPTIONS_PATH) {
        Ok(u) => u,
        Err(e) => return fail(&format!("cdp.platform_base: {e}")),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    match command {
        WebhooksCommand::Subscribe {
            url: target,
            description,
        } => {
            let body = match subscribe_body(&target, &description) {
                Ok(b) => b,
                Err(e) => return fail(&e),
            };
            let answer = runtime.block_on(cdp.call_json(reqwest::Method::POST, &url, Some(&body)));
            match answer {
                Ok((v, _)) => {
                    let id = v.get("subscriptionId").and_then(Value::as_str);
                    // The root-level secret; metadata.secret is Coinbase's deprecated copy.
                    let secret = v
                        .get("secret")
                        .or_else(|| v.get("metadata").and_then(|m| m.get("secret")))
                        .and_then(Value::as_str);
                    let (Some(id), Some(secret)) = (id, secret) else {
                        return fail("the CDP answer has no subscriptionId or secret");
                    };
                    println!("subscription: {id}");
                    println!("secret: {secret}");
                    eprintln!(
                        "Put the secret in {} (comma-separated with the old one while rotating). It is not shown again.",
                        settings.config.webhooks.secrets_env
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e.to_string()),
            }
        }
        WebhooksCommand::List => {
            let mut page_token: Option<String> = None;
            for _ in 0..MAX_PAGES {
                let mut page_url = url.clone();
                page_url.query_pairs_mut().append_pair("pageSize", "100");
                if let Some(t) = &page_token {
                    page_url.query_pairs_mut().append_pair("pageToken", t);
                }
                let page =
                    match runtime.block_on(cdp.call_json(reqwest::Method::GET, &page_url, None)) {
                        Ok((v, _)) => v,
                        Err(e) => return fail(&e.to_string()),
                    };
                for line in list_lines(&page) {
                    println!("{line}");
                }
                page_token = page
                    .get("nextPageToken")
                    .and_then(Value::as_str)
                    .filter(|t| !t.is_empty())
                    .map(str::to_string);
                if page_token.is_none() {
                    break;
                }
            }
            ExitCode::SUCCESS
        }
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_body_has_the_eight_events_and_is_enabled() {
        let b = subscribe_body("https://gw.example/onramp/webhooks", "d").unwrap();
        assert_eq!(b["eventTypes"].as_array().unwrap().len(), 8);
        assert_eq!(b["isEnabled"], true);
        assert_eq!(b["target"]["url"], "https://gw.example/onramp/webhooks");
        assert!(subscribe_body("http://gw.example/x", "d").is_err());
        assert!(subscribe_body("nope", "d").is_err());
    }

    #[test]
    fn list_never_prints_secrets() {
        let page = json!({"subscriptions": [{"subscriptionId": "s1", "secret": "TOPSECRET",
            "target": {"url": "https://a/b"}, "isEnabled": true,
            "eventTypes": ["onramp.transaction.success"]}]});
        let lines = list_lines(&page);
        assert_eq!(
            lines,
            ["s1  https://a/b  enabled=true  events=onramp.transaction.success"]
        );
    }
}

//! Headless Apple Pay / Google Pay orders (`orders.enabled`): the v2 Create Onramp Order
//! API, the only Coinbase path for buyers without a Coinbase account.
//!
//! The browser chooses only what to buy ([`OrderRequest`]); who buys ([`Buyer`]: verified
//! email and phone, when they were verified and the terms accepted, `partnerUserRef`, the
//! wallet for the network) comes from the app's context answer or the ticket, never from
//! the browser (Coinbase enforces the contact data server-side and holds the integrator
//! liable for it). `clientIp` and `domain` are the gateway's. The payment link Coinbase
//! returns is handed out only if it is Coinbase's own payment host.

use serde_json::{json, Map, Value};
use url::Url;

use super::is_amount;
use crate::onramp::request::MintRequest;
use crate::onramp::session_v2::is_coinbase_pay_url;

/// Under `cdp.platform_base` (which ends in `/`).
pub const ORDERS_PATH: &str = "v2/onramp/orders";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentMethod {
    ApplePay,
    GooglePay,
}

impl PaymentMethod {
    fn cdp(self) -> &'static str {
        match self {
            PaymentMethod::ApplePay => "GUEST_CHECKOUT_APPLE_PAY",
            PaymentMethod::GooglePay => "GUEST_CHECKOUT_GOOGLE_PAY",
        }
    }

    /// The sandbox flag Coinbase reads on the payment link (a fake pay sheet).
    fn sandbox_flag(self) -> &'static str {
        match self {
            PaymentMethod::ApplePay => "useApplePaySandbox",
            PaymentMethod::GooglePay => "useGooglePaySandbox",
        }
    }
}

/// What the browser may choose. Any other member (identity included) is ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRequest {
    /// `("paymentAmount" | "purchaseAmount", value)`.
    pub amount: (&'static str, String),
    pub payment_currency: String,
    pub purchase_currency: String,
    pub destination_network: String,
    pub payment_method: PaymentMethod,
}

fn bad(field: &str, reason: &str) -> String {
    format!("{field}: {reason}")
}

impl OrderRequest {
    /// Errors are `"field: reason"` (400).
    pub fn parse(body: &Map<String, Value>, blockchains: &[String]) -> Result<Self, String> {
        let field = |name: &str| -> Result<Option<String>, String> {
            match body.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) if s.len() <= 64 => Ok(Some(s.clone())),
                Some(Value::Number(n)) if name.ends_with("Amount") => Ok(Some(n.to_string())),
                _ => Err(bad(name, "must be a short string")),
            }
        };
        let token = |name: &str| -> Result<String, String> {
            let v = field(name)?.ok_or_else(|| bad(name, "required"))?;
            if v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                Ok(v)
            } else {
                Err(bad(name, "invalid value"))
            }
        };
        let amount = match (field("paymentAmount")?, field("purchaseAmount")?) {
            (Some(a), None) => ("paymentAmount", a),
            (None, Some(a)) => ("purchaseAmount", a),
            (Some(_), Some(_)) => {
                return Err(bad(
                    "purchaseAmount",
                    "give paymentAmount or purchaseAmount, not both",
                ))
            }
            (None, None) => {
                return Err(bad(
                    "paymentAmount",
                    "paymentAmount or purchaseAmount required",
                ))
            }
        };
        if !is_amount(&amount.1) {
            return Err(bad(amount.0, "must be a positive decimal, e.g. \"100\""));
        }
        let destination_network = token("destinationNetwork")?.to_ascii_lowercase();
        if !blockchains
            .iter()
            .any(|b| b.eq_ignore_ascii_case(&destination_network))
        {
            return Err(bad("destinationNetwork", "not one of onramp.blockchains"));
        }
        let payment_method = match field("paymentMethod")?.as_deref() {
            Some("apple_pay") => PaymentMethod::ApplePay,
            Some("google_pay") => PaymentMethod::GooglePay,
            _ => {
                return Err(bad(
                    "paymentMethod",
                    "must be \"apple_pay\" or \"google_pay\"",
                ))
            }
        };
        Ok(Self {
            amount,
            payment_currency: token("paymentCurrency")?.to_ascii_uppercase(),
            purchase_currency: token("purchaseCurrency")?.to_ascii_uppercase(),
            destination_network,
            payment_method,
        })
    }
}

/// The buyer, as the app vouches for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buyer {
    pub partner_user_ref: String,
    pub destination_address: String,
    pub email: String,
    pub phone_number: String,
    pub phone_number_verified_at: String,
    pub agreement_accepted_at: String,
}

/// The caller's `partnerUserRef` as CDP stores it (`sandbox-` prefixed in the sandbox).
pub fn partner_user_ref(request: &MintRequest, sandbox: bool) -> Option<String> {
    let r = request
        .presets
        .iter()
        .find(|(k, _)| k == "partnerUserRef")
        .map(|(_, v)| v.clone())
        .filter(|v| !v.is_empty())?;
    Some(if sandbox && !r.starts_with("sandbox-") {
        format!("sandbox-{r}")
    } else {
        r
    })
}

impl Buyer {
    /// From the validated request (address, `partnerUserRef`) and the app's other members
    /// (contact data). `Err` names what is missing (`403`).
    pub fn from_app(
        request: &MintRequest,
        app: &Map<String, Value>,
        network: &str,
        sandbox: bool,
    ) -> Result<Self, &'static str> {
        let text = |name: &str| {
            app.get(name)
                .and_then(Value::as_str)
                .filter(|v| !v.is_empty() && v.len() <= 320 && !v.contains(['\r', '\n']))
                .map(str::to_string)
        };
        Ok(Self {
            partner_user_ref: partner_user_ref(request, sandbox)
                .ok_or("the application named no partnerUserRef for this user")?,
            destination_address: request
                .addresses
                .iter()
                .find(|a| a.blockchains.iter().any(|b| b == network))
                .map(|a| a.address.clone())
                .ok_or("the application named no address of this user for destinationNetwork")?,
            email: text("email").ok_or("the application named no verified email for this user")?,
            phone_number: text("phoneNumber")
                .ok_or("the application named no verified phoneNumber for this user")?,
            phone_number_verified_at: text("phoneNumberVerifiedAt")
                .ok_or("the application named no phoneNumberVerifiedAt for this user")?,
            agreement_accepted_at: text("agreementAcceptedAt")
                .ok_or("the application named no agreementAcceptedAt for this user")?,
        })
    }
}

/// The Create Onramp Order body.
pub fn order_body(q: &OrderRequest, buyer: &Buyer, client_ip: &str, domain: &str) -> Value {
    let mut b = json!({
        "paymentCurrency": q.payment_currency,
        "purchaseCurrency": q.purchase_currency,
        "paymentMethod": q.payment_method.cdp(),
        "destinationAddress": buyer.destination_address,
        "destinationNetwork": q.destination_network,
        "partnerUserRef": buyer.partner_user_ref,
        "email": buyer.email,
        "phoneNumber": buyer.phone_number,
        "phoneNumberVerifiedAt": buyer.phone_number_verified_at,
        "agreementAcceptedAt": buyer.agreement_accepted_at,
        "clientIp": client_ip,
    });
    b[q.amount.0] = json!(q.amount.1);
    // Coinbase refuses a domain it has not allowlisted (e.g. localhost): "" sends none.
    if !domain.is_empty() {
        b["domain"] = json!(domain);
    }
    b
}

/// Checks the `201 {order, paymentLink}` answer and shapes the client's
/// `{orderId, status, paymentLink: {url, type}, quote}`.
pub fn order_answer(answer: &Value, method: PaymentMethod, sandbox: bool) -> Result<Value, String> {
    let order = answer.get("order").ok_or("no order in the answer")?;
    let order_id = order
        .get("orderId")
        .and_then(Value::as_str)
        .filter(|id| is_order_id(id))
        .ok_or("order.orderId missing or malformed")?;
    let link = answer
        .get("paymentLink")
        .ok_or("no paymentLink in the answer")?;
    let mut url = link
        .get("url")
        .and_then(Value::as_str)
        .and_then(|u| Url::parse(u).ok())
        .ok_or("paymentLink.url is not a URL")?;
    if !is_coinbase_pay_url(&url, sandbox) {
        return Err(format!(
            "paymentLink.url points to {}://{}, not Coinbase's payment host",
            url.scheme(),
            url.host_str().unwrap_or_default()
        ));
    }
    if sandbox {
        url.query_pairs_mut()
            .append_pair(method.sandbox_flag(), "true");
    }
    let mut quote = Map::new();
    for k in [
        "paymentTotal",
        "paymentSubtotal",
        "paymentCurrency",
        "purchaseAmount",
        "purchaseCurrency",
        "fees",
        "exchangeRate",
    ] {
        if let Some(v) = order.get(k) {
            quote.insert(k.into(), v.clone());
        }
    }
    Ok(json!({
        "orderId": order_id,
        "status": order.get("status").cloned().unwrap_or(Value::Null),
        "paymentLink": {
            "url": url.as_str(),
            "type": link.get("paymentLinkType").cloned().unwrap_or(Value::Null),
        },
        "quote": quote,
    }))
}

/// An order id as Coinbase issues them (a UUID); anything else is not looked up.
pub fn is_order_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `GET orders/{id}`'s answer: the order, only if it belongs to `caller`.
pub fn owned_order(answer: &Value, caller: &str) -> Option<Value> {
    let order = answer.get("order")?;
    (order.get("partnerUserRef").and_then(Value::as_str) == Some(caller)).then(|| order.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onramp::request::AddressEntry;

    fn request() -> MintRequest {
        MintRequest {
            addresses: vec![AddressEntry {
                address: "0xabc".into(),
                blockchains: vec!["base".into()],
            }],
            assets: vec![],
            presets: vec![("partnerUserRef".into(), "alice".into())],
        }
    }

    fn app() -> Map<String, Value> {
        json!({"email": "a@example.com", "phoneNumber": "+12125550123",
            "phoneNumberVerifiedAt": "2026-11-30T10:00:00Z",
            "agreementAcceptedAt": "2026-11-30T10:00:00Z"})
        .as_object()
        .unwrap()
        .clone()
    }

    #[test]
    fn request_fields_are_checked_and_identity_ignored() {
        let chains = vec!["base".to_string()];
        let body = json!({"paymentAmount": "100", "paymentCurrency": "usd",
            "purchaseCurrency": "USDC", "destinationNetwork": "base",
            "paymentMethod": "apple_pay", "email": "evil@example.com"});
        let q = OrderRequest::parse(body.as_object().unwrap(), &chains).unwrap();
        assert_eq!(q.amount, ("paymentAmount", "100".to_string()));
        assert_eq!(q.payment_currency, "USD");
        assert_eq!(q.payment_method, PaymentMethod::ApplePay);
        for (k, v) in [
            ("paymentMethod", json!("card")),
            ("destinationNetwork", json!("solana")),
            ("paymentAmount", json!("0")),
            ("purchaseAmount", json!("1")),
            ("paymentCurrency", json!("US D")),
        ] {
            let mut b = body.clone();
            b[k] = v;
            assert!(
                OrderRequest::parse(b.as_object().unwrap(), &chains).is_err(),
                "{k}"
            );
        }
        let buyer = Buyer::from_app(&request(), &app(), "base", true).unwrap();
        assert_eq!(buyer.partner_user_ref, "sandbox-alice");
        let b = order_body(&q, &buyer, "203.0.113.7", "shop.example.com");
        assert_eq!(b["email"], "a@example.com");
        assert_eq!(b["paymentMethod"], "GUEST_CHECKOUT_APPLE_PAY");
        assert_eq!(b["domain"], "shop.example.com");
        assert!(order_body(&q, &buyer, "203.0.113.7", "")
            .get("domain")
            .is_none());
        for missing in [
            "email",
            "phoneNumber",
            "phoneNumberVerifiedAt",
            "agreementAcceptedAt",
        ] {
            let mut a = app();
            a.remove(missing);
            assert!(
                Buyer::from_app(&request(), &a, "base", false).is_err(),
                "{missing}"
            );
        }
        assert!(Buyer::from_app(&request(), &app(), "ethereum", false).is_err());
    }

    #[test]
    fn payment_links_are_checked_and_flagged_in_the_sandbox() {
        let answer = |url: &str| {
            json!({"order": {"orderId": "3f2c0c9e-7d55", "status": "ONRAMP_ORDER_STATUS_PENDING_PAYMENT",
                "paymentTotal": "101.50", "partnerUserRef": "alice"},
                "paymentLink": {"url": url, "paymentLinkType": "PAYMENT_LINK_TYPE_APPLE_PAY_BUTTON"}})
        };
        let ok = answer("https://pay.coinbase.com/v2/api-onramp/apple-pay?sessionToken=t");
        let a = order_answer(&ok, PaymentMethod::ApplePay, true).unwrap();
        assert_eq!(
            a["paymentLink"]["url"],
            "https://pay.coinbase.com/v2/api-onramp/apple-pay?sessionToken=t&useApplePaySandbox=true"
        );
        assert_eq!(a["quote"]["paymentTotal"], "101.50");
        let a = order_answer(&ok, PaymentMethod::ApplePay, false).unwrap();
        assert!(!a["paymentLink"]["url"]
            .as_str()
            .unwrap()
            .contains("Sandbox"));
        for bad in [
            "https://evil.example/pay",
            "http://pay.coinbase.com/x",
            "https://pay.coinbase.com:8443/x",
            "https://user@pay.coinbase.com/x",
        ] {
            assert!(
                order_answer(&answer(bad), PaymentMethod::ApplePay, true).is_err(),
                "{bad}"
            );
        }
        assert!(owned_order(&ok, "alice").is_some());
        assert!(owned_order(&ok, "bob").is_none());
        assert!(!is_order_id("../x") && !is_order_id(""));
    }
}

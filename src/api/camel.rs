//! CDP's v1 read APIs answer in snake_case (protojson); the browser SDKs
//! (`@coinbase/cdp-react`) read camelCase. Every object key is converted, recursively;
//! values are untouched and unknown fields are kept (a new CDP field reaches the SDK).

use serde_json::{Map, Value};

/// `payment_currencies` → `paymentCurrencies`; already-camel keys stay as they are.
pub fn camel_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut upper = false;
    for (i, ch) in key.chars().enumerate() {
        if ch == '_' && i > 0 {
            upper = true;
        } else if upper {
            out.extend(ch.to_uppercase());
            upper = false;
        } else {
            out.push(ch);
        }
    }
    if upper {
        // A trailing underscore is kept rather than lost.
        out.push('_');
    }
    out
}

/// Converts every object key of `value` to camelCase.
pub fn camel_case(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut out = Map::with_capacity(map.len());
            for (k, v) in map {
                out.insert(camel_key(&k), camel_case(v));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.into_iter().map(camel_case).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_camel_cased_recursively_values_kept() {
        let v = json!({
            "payment_currencies": [{"id": "USD", "limits": [{"id": "CARD", "min": "1"}]}],
            "icon_url": "https://x/y_z.png",
            "alreadyCamel": 1,
            "_leading": 2,
            "trailing_": 3,
            "brand_new_field": {"nested_value": "a_b"},
        });
        assert_eq!(
            camel_case(v),
            json!({
                "paymentCurrencies": [{"id": "USD", "limits": [{"id": "CARD", "min": "1"}]}],
                "iconUrl": "https://x/y_z.png",
                "alreadyCamel": 1,
                "_leading": 2,
                "trailing_": 3,
                "brandNewField": {"nestedValue": "a_b"},
            })
        );
    }
}

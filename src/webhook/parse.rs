//! The providers' signature headers, parsed. Each parser takes the header's
//! text and returns the candidate signatures (and timestamp) it carries,
//! or `None` when the header is malformed; none of them allocates more
//! than [`MAX_SIGNATURES`] candidates, whatever the header's length.

use base64::Engine;

/// The most signatures one header may offer: rotation needs two or three;
/// more would only multiply the work an unauthenticated sender can cause.
pub const MAX_SIGNATURES: usize = 8;

/// An HMAC-SHA256 tag.
pub type Tag = [u8; 32];

/// `X-Hub-Signature-256: sha256=<64 hex>` (GitHub).
pub fn github(text: &str) -> Option<Tag> {
    hex_tag(text.trim().strip_prefix("sha256=")?)
}

/// `X-Slack-Signature: v0=<64 hex>` (Slack).
pub fn slack(text: &str) -> Option<Tag> {
    hex_tag(text.trim().strip_prefix("v0=")?)
}

/// `X-Shopify-Hmac-Sha256: <base64>` (Shopify).
pub fn shopify(text: &str) -> Option<Tag> {
    b64_tag(text.trim())
}

/// A decimal Unix timestamp in seconds (Slack's, Standard Webhooks').
pub fn timestamp(text: &str) -> Option<i64> {
    let t = text.trim();
    if t.is_empty() || t.len() > 12 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

/// A parsed `Stripe-Signature` header.
#[derive(Debug)]
pub struct StripeHeader<'a> {
    /// The timestamp as sent: it is signed as text.
    pub t_text: &'a str,
    pub t: i64,
    pub tags: Vec<Tag>,
}

/// `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>...][,v0=...]`: the
/// timestamp and every `v1` tag; other schemes (`v0` is Stripe's test-mode
/// SHA-1 scheme) are ignored as Stripe's own libraries do.
pub fn stripe(text: &str) -> Option<StripeHeader<'_>> {
    let mut t: Option<(&str, i64)> = None;
    let mut tags = Vec::new();
    for item in text.split(',') {
        let (k, v) = item.trim().split_once('=')?;
        match k {
            // A second timestamp or one signature too many: malformed.
            "t" if t.is_some() => return None,
            "t" => t = Some((v, timestamp(v)?)),
            "v1" if tags.len() == MAX_SIGNATURES => return None,
            "v1" => tags.push(hex_tag(v)?),
            _ => {}
        }
    }
    let (t_text, t) = t?;
    Some(StripeHeader { t_text, t, tags })
}

/// `webhook-signature: v1,<base64> [v1,<base64> ...]` (Standard Webhooks):
/// space-delimited `version,signature` pairs; only `v1` (HMAC-SHA256) is
/// checked, others (`v1a`, asymmetric) are skipped.
pub fn standard(text: &str) -> Option<Vec<Tag>> {
    let mut tags = Vec::new();
    for item in text.split(' ').filter(|s| !s.is_empty()) {
        let (version, sig) = item.split_once(',')?;
        if version != "v1" {
            continue;
        }
        if tags.len() == MAX_SIGNATURES {
            return None;
        }
        tags.push(b64_tag(sig)?);
    }
    Some(tags)
}

/// A Standard Webhooks secret: `whsec_` and standard base64 of the key
/// bytes (the prefix is optional, as in the reference libraries).
pub fn standard_secret(text: &str) -> Option<Vec<u8>> {
    let b64 = text.trim();
    let b64 = b64.strip_prefix("whsec_").unwrap_or(b64);
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .filter(|k| !k.is_empty())
}

fn hex_tag(text: &str) -> Option<Tag> {
    let b = text.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn b64_tag(text: &str) -> Option<Tag> {
    // 32 bytes are 44 base64 characters; refuse longer text before decoding.
    if text.len() > 44 {
        return None;
    }
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?
        .try_into()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn github_and_slack() {
        assert_eq!(github(&format!("sha256={HEX}")).unwrap()[0], 0x75);
        assert_eq!(
            github(&format!("sha256={}", HEX.to_uppercase())).unwrap()[0],
            0x75
        );
        assert!(github(HEX).is_none());
        assert!(github(&format!("sha1={HEX}")).is_none());
        assert!(github(&format!("sha256={}", &HEX[1..])).is_none());
        assert!(github(&format!("sha256={}g", &HEX[1..])).is_none());
        assert!(slack(&format!("v0={HEX}")).is_some());
        assert!(slack(&format!("v1={HEX}")).is_none());
    }

    #[test]
    fn stripe_header() {
        let text = format!("t=1492774577,v1={HEX},v0=abc,v1={HEX}");
        let h = stripe(&text).unwrap();
        assert_eq!((h.t_text, h.t, h.tags.len()), ("1492774577", 1492774577, 2));
        assert!(stripe(&format!("v1={HEX}")).is_none(), "no timestamp");
        assert!(
            stripe(&format!("t=1,t=2,v1={HEX}")).is_none(),
            "two timestamps"
        );
        assert!(stripe(&format!("t=x,v1={HEX}")).is_none());
        assert!(stripe("t=1,v1=zz").is_none());
        assert_eq!(stripe("t=1").unwrap().tags.len(), 0);
        let many = format!("t=1{}", format!(",v1={HEX}").repeat(MAX_SIGNATURES + 1));
        assert!(stripe(&many).is_none());
    }

    #[test]
    fn standard_header_and_secret() {
        let sig = "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert_eq!(standard(&format!("v1,{sig}")).unwrap().len(), 1);
        assert_eq!(
            standard(&format!("v1a,xyz v1,{sig}  v1,{sig}"))
                .unwrap()
                .len(),
            2
        );
        assert!(standard("v1,notbase64!").is_none());
        assert!(standard("v1").is_none());
        assert_eq!(standard("").unwrap().len(), 0);
        assert_eq!(
            standard_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
                .unwrap()
                .len(),
            24
        );
        assert!(standard_secret("whsec_").is_none());
        assert!(standard_secret("whsec_***").is_none());
    }

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(" 1614265330 "), Some(1614265330));
        for bad in ["", "-1", "1.5", "1e9", "9999999999999"] {
            assert_eq!(timestamp(bad), None, "{bad:?}");
        }
    }
}

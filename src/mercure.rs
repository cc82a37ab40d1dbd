//! The Mercure 0.x protocol (dunglas/mercure v0.24, the dialect symfony/mercure speaks) as pure
//! functions: publish-form and subscribe-query parsing, topic selectors (`*`, exact, RFC 6570
//! templates), JWT verification, authorization rules, SSE framing and the subscription JSON.
//! No sockets, no clock reads (time is passed in), no global state: the hub calls these and owns
//! everything else.

use std::fmt;

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use regex::Regex;
use serde::Deserialize;

/// A refusal, shown to the peer as `status` with `reason` as the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The HTTP status this error is answered with (400, 401, 403, 404).
    pub status: u16,
    /// A short reason, safe to show to the peer.
    pub reason: &'static str,
}

impl Error {
    const fn new(status: u16, reason: &'static str) -> Error {
        Error { status, reason }
    }
    const fn bad(reason: &'static str) -> Error {
        Error::new(400, reason)
    }
    const fn unauthorized(reason: &'static str) -> Error {
        Error::new(401, reason)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.reason)
    }
}

impl std::error::Error for Error {}

/// The reference hub's cap on `topic` fields, in a publish or a subscribe.
pub const MAX_TOPICS: usize = 1000;

/// Hub-generated topics live here; publishers must not forge them (403, as the Go hub).
const RESERVED_TOPIC: &str = "/.well-known/mercure";

// ---------------------------------------------------------------------------------------------
// Form / query decoding

/// Decodes one `application/x-www-form-urlencoded` component: `+` is space, `%XX` a byte.
/// A bad escape or invalid UTF-8 is a 400 (Go also refuses bad escapes).
fn form_unescape(raw: &[u8]) -> Result<String, Error> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = raw.get(i + 1).and_then(|c| (*c as char).to_digit(16));
                let lo = raw.get(i + 2).and_then(|c| (*c as char).to_digit(16));
                match (hi, lo) {
                    (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                    _ => return Err(Error::bad("invalid percent-encoding")),
                }
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| Error::bad("invalid UTF-8"))
}

/// Splits a form body or query into decoded (name, value) pairs, in order. Empty pieces
/// (`a=1&&b`) are skipped and a name without `=` has an empty value, as in Go and WHATWG.
/// `;` is an ordinary character here (WHATWG), where Go >= 1.17 answers 400: generous on purpose.
fn form_pairs(body: &[u8]) -> Result<Vec<(String, String)>, Error> {
    let mut pairs = Vec::new();
    for piece in body.split(|c| *c == b'&') {
        if piece.is_empty() {
            continue;
        }
        let (k, v) = match piece.iter().position(|c| *c == b'=') {
            Some(p) => (&piece[..p], &piece[p + 1..]),
            None => (piece, &b""[..]),
        };
        pairs.push((form_unescape(k)?, form_unescape(v)?));
    }
    Ok(pairs)
}

// ---------------------------------------------------------------------------------------------
// Publish

/// A parsed publish request (`POST /.well-known/mercure`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The update's topics: the first is canonical, the rest alternates, in the order sent.
    /// An empty `topic=` is kept as the topic `""` (the Go hub does the same).
    pub topics: Vec<String>,
    /// The payload; empty when no `data` field was sent.
    pub data: String,
    /// True when a `private` field is present, whatever its value (symfony sends `on`).
    pub private: bool,
    /// The publisher's chosen id, or None to let the hub generate one.
    pub id: Option<String>,
    /// The SSE `event:` name.
    pub event_type: Option<String>,
    /// The SSE `retry:` delay in milliseconds.
    pub retry: Option<u64>,
}

/// True when `s` is safe on an SSE field line: CR or LF would start a new line (a forged
/// field) and NUL is refused by the Go hub too.
fn sse_safe(s: &str) -> bool {
    !s.contains(['\r', '\n', '\0'])
}

/// Parses a publish form body. For the single-valued fields (`data`, `id`, `type`, `retry`)
/// the FIRST occurrence wins, as Go's `PostForm.Get` does in the reference hub.
pub fn parse_publish(body: &[u8], max_topics: usize) -> Result<Publish, Error> {
    let mut topics = Vec::new();
    let (mut data, mut id, mut event_type, mut retry) = (None, None, None, None);
    let mut private = false;
    for (k, v) in form_pairs(body)? {
        match k.as_str() {
            "topic" => {
                if topics.len() == max_topics {
                    return Err(Error::bad("too many topics"));
                }
                if v.contains(RESERVED_TOPIC) {
                    return Err(Error::new(403, "topic in the reserved /.well-known/mercure namespace"));
                }
                if v.chars().any(char::is_control) {
                    return Err(Error::bad("topic contains a control character"));
                }
                topics.push(v);
            }
            "data" => {
                data.get_or_insert(v);
            }
            "private" => private = true,
            "id" => {
                id.get_or_insert(v);
            }
            "type" => {
                event_type.get_or_insert(v);
            }
            "retry" => {
                retry.get_or_insert(v);
            }
            _ => {}
        }
    }
    if topics.is_empty() {
        return Err(Error::bad(r#"missing "topic""#));
    }
    let id = id.filter(|s| !s.is_empty());
    if let Some(id) = &id {
        if id.starts_with('#') {
            return Err(Error::bad(r##""id" must not start with "#""##));
        }
        if !sse_safe(id) {
            return Err(Error::bad(r#""id" contains a forbidden control character"#));
        }
    }
    let event_type = event_type.filter(|s| !s.is_empty());
    if event_type.as_deref().is_some_and(|t| !sse_safe(t)) {
        return Err(Error::bad(r#""type" contains a forbidden control character"#));
    }
    let retry = match retry.filter(|s| !s.is_empty()) {
        None => None,
        // u64::from_str accepts a leading '+', Go's ParseUint does not.
        Some(r) if r.bytes().all(|c| c.is_ascii_digit()) => {
            Some(r.parse::<u64>().map_err(|_| Error::bad(r#"invalid "retry""#))?)
        }
        Some(_) => return Err(Error::bad(r#"invalid "retry""#)),
    };
    Ok(Publish { topics, data: data.unwrap_or_default(), private, id, event_type, retry })
}

// ---------------------------------------------------------------------------------------------
// Subscribe

/// A parsed subscribe query (`GET /.well-known/mercure?...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeQuery {
    /// The topic selectors, in the order sent.
    pub topics: Vec<String>,
    /// `lastEventID`, else the legacy `Last-Event-ID` query parameter (first of each wins).
    /// The `Last-Event-ID` header, when present, outranks both; that is the caller's job.
    pub last_event_id: Option<String>,
    /// The `authorization` query parameter (a JWT), if any.
    pub authorization: Option<String>,
}

/// Parses the query string (the part after `?`, without it).
pub fn parse_subscribe(query: &str) -> Result<SubscribeQuery, Error> {
    let mut topics = Vec::new();
    let (mut last, mut legacy, mut authorization) = (None, None, None);
    for (k, v) in form_pairs(query.as_bytes())? {
        match k.as_str() {
            "topic" => {
                if topics.len() == MAX_TOPICS {
                    return Err(Error::bad("too many topics"));
                }
                topics.push(v);
            }
            "lastEventID" => {
                last.get_or_insert(v);
            }
            "Last-Event-ID" => {
                legacy.get_or_insert(v);
            }
            "authorization" => {
                authorization.get_or_insert(v);
            }
            _ => {}
        }
    }
    if topics.is_empty() {
        return Err(Error::bad(r#"Missing "topic" parameter."#));
    }
    Ok(SubscribeQuery { topics, last_event_id: last.or(legacy), authorization })
}

// ---------------------------------------------------------------------------------------------
// Topic selectors

/// A compiled topic selector; compile once per subscription, match per update.
#[derive(Debug, Clone)]
pub enum Selector {
    /// `*`: matches every topic.
    All,
    /// A plain string (or a malformed template): matches only itself.
    Exact(String),
    /// An RFC 6570 URI Template: matches itself literally, or through `re`.
    Template {
        /// The selector as written.
        source: String,
        /// The anchored regex the template compiles to.
        re: Regex,
    },
}

// Value characters. RFC 6570 expansion would percent-encode everything but unreserved for a
// simple `{var}`; we are more generous and also accept sub-delims, `:` and `@` (what a path
// segment may hold) and raw non-ASCII, but never `/ ? # & [ ]`, so `{id}` stays inside one
// segment. `{+var}`/`{#var}` add the reserved set, so they may span segments.
const V: &str = r"(?:[A-Za-z0-9\-._~!$'()*+,;=:@]|%[0-9A-Fa-f]{2}|[^\x00-\x7F])";
const R: &str = r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?#\[\]]|%[0-9A-Fa-f]{2}|[^\x00-\x7F])";

/// Compiles one expression body (between the braces) to a regex fragment, or None if malformed.
fn expression_regex(expr: &str) -> Option<String> {
    let (op, list) = match expr.chars().next()? {
        c @ ('+' | '#' | '.' | '/' | ';' | '?' | '&') => (Some(c), &expr[1..]),
        _ => (None, expr),
    };
    let mut count = 0usize;
    let mut explode = false;
    for spec in list.split(',') {
        let name = if let Some(n) = spec.strip_suffix('*') {
            explode = true;
            n
        } else if let Some((n, len)) = spec.split_once(':') {
            // A prefix length is accepted but not enforced: any length matches.
            if len.is_empty() || len.len() > 4 || !len.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            n
        } else {
            spec
        };
        if name.is_empty()
            || !name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'%')
        {
            return None;
        }
        count += 1;
    }
    // How many prefixed pieces may appear: one per variable, or any number when exploded.
    let rep = if explode { "*".to_string() } else { format!("{{0,{count}}}") };
    Some(match op {
        None => format!("{V}+"),
        Some('+') => format!("{R}+"),
        Some('#') => format!("(?:#{R}*)?"),
        Some('.') => format!(r"(?:\.{V}*){rep}"),
        Some('/') => format!("(?:/{V}*){rep}"),
        Some(';') => format!("(?:;{V}*){rep}"),
        Some('?') => format!(r"(?:\?{V}*(?:&{V}*)*)?"),
        _ => format!("(?:&{V}*){rep}"),
    })
}

/// Compiles a URI template to an anchored regex; None when it is malformed.
fn template_regex(t: &str) -> Option<Regex> {
    let mut pattern = String::from("^");
    let mut rest = t;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return None;
        }
        pattern.push_str(&regex::escape(&rest[..open]));
        let after = &rest[open + 1..];
        let close = after.find(['{', '}'])?;
        if after.as_bytes()[close] == b'{' {
            return None;
        }
        pattern.push_str(&expression_regex(&after[..close])?);
        rest = &after[close + 1..];
    }
    pattern.push_str(&regex::escape(rest));
    pattern.push('$');
    Regex::new(&pattern).ok()
}

impl Selector {
    /// Compiles a selector string; a malformed template becomes an exact selector.
    pub fn new(s: &str) -> Selector {
        if s == "*" {
            return Selector::All;
        }
        if s.contains('{') {
            if let Some(re) = template_regex(s) {
                return Selector::Template { source: s.to_string(), re };
            }
        }
        Selector::Exact(s.to_string())
    }

    /// True when this selector matches `topic`.
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            Selector::All => true,
            Selector::Exact(s) => s == topic,
            Selector::Template { source, re } => source == topic || re.is_match(topic),
        }
    }

    /// The selector as written.
    pub fn as_str(&self) -> &str {
        match self {
            Selector::All => "*",
            Selector::Exact(s) | Selector::Template { source: s, .. } => s,
        }
    }

    /// `Some(topic)` when this selector can match only that exact string, so the caller can
    /// index it in a map instead of testing it against every update.
    pub fn is_exact(&self) -> Option<&str> {
        match self {
            Selector::Exact(s) => Some(s),
            _ => None,
        }
    }
}

/// Compiles a list of selector strings (e.g. a `mercure.subscribe` claim).
pub fn selectors(v: &[String]) -> Vec<Selector> {
    v.iter().map(|s| Selector::new(s)).collect()
}

// ---------------------------------------------------------------------------------------------
// Authorization

/// True when every topic of an update is matched by at least one `mercure.publish` selector.
pub fn can_publish(allowed: &[String], topics: &[String]) -> bool {
    let sel = selectors(allowed);
    topics.iter().all(|t| sel.iter().any(|s| s.matches(t)))
}

/// True when a subscriber's `mercure.subscribe` selectors match at least one of the update's
/// topics (canonical or alternate): the rule for delivering a private update.
pub fn can_receive(subscribe_selectors: &[Selector], topics: &[String]) -> bool {
    topics.iter().any(|t| subscribe_selectors.iter().any(|s| s.matches(t)))
}

// ---------------------------------------------------------------------------------------------
// JWT

/// The signing algorithms a hub may be configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// HMAC SHA-256 (the Mercure default).
    HS256,
    /// HMAC SHA-384.
    HS384,
    /// HMAC SHA-512.
    HS512,
    /// RSA PKCS#1 v1.5 SHA-256.
    RS256,
    /// RSA PKCS#1 v1.5 SHA-384.
    RS384,
    /// RSA PKCS#1 v1.5 SHA-512.
    RS512,
    /// ECDSA P-256 SHA-256.
    ES256,
    /// ECDSA P-384 SHA-384.
    ES384,
}

impl std::str::FromStr for Alg {
    type Err = String;
    /// Parses a config string, case-insensitively (`hs256`, `RS256`, ...).
    fn from_str(s: &str) -> Result<Alg, String> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "HS256" => Alg::HS256,
            "HS384" => Alg::HS384,
            "HS512" => Alg::HS512,
            "RS256" => Alg::RS256,
            "RS384" => Alg::RS384,
            "RS512" => Alg::RS512,
            "ES256" => Alg::ES256,
            "ES384" => Alg::ES384,
            _ => return Err(format!("unsupported JWT algorithm {s:?}")),
        })
    }
}

impl Alg {
    fn jwt(self) -> Algorithm {
        match self {
            Alg::HS256 => Algorithm::HS256,
            Alg::HS384 => Algorithm::HS384,
            Alg::HS512 => Algorithm::HS512,
            Alg::RS256 => Algorithm::RS256,
            Alg::RS384 => Algorithm::RS384,
            Alg::RS512 => Algorithm::RS512,
            Alg::ES256 => Algorithm::ES256,
            Alg::ES384 => Algorithm::ES384,
        }
    }
}

/// A verification key with the one algorithm it accepts.
#[derive(Clone)]
pub struct JwtKey {
    /// The only algorithm a token may be signed with.
    alg: Alg,
    /// The decoded key.
    key: DecodingKey,
}

impl fmt::Debug for JwtKey {
    // Never print key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JwtKey({:?})", self.alg)
    }
}

impl JwtKey {
    /// Builds a key: for HS* the secret's bytes, for RS*/ES* a PEM public key.
    pub fn new(alg: Alg, key: &str) -> Result<JwtKey, String> {
        let key = match alg {
            Alg::HS256 | Alg::HS384 | Alg::HS512 => {
                if key.is_empty() {
                    return Err("empty HMAC secret".into());
                }
                DecodingKey::from_secret(key.as_bytes())
            }
            _ => {
                // jsonwebtoken would take a private RSA key here and then fail every token.
                if key.contains("PRIVATE KEY") {
                    return Err("expected a PEM public key, got a private key".into());
                }
                let k = if matches!(alg, Alg::ES256 | Alg::ES384) {
                    DecodingKey::from_ec_pem(key.as_bytes())
                } else {
                    DecodingKey::from_rsa_pem(key.as_bytes())
                };
                k.map_err(|e| format!("invalid PEM public key for {alg:?}: {e}"))?
            }
        };
        Ok(JwtKey { alg, key })
    }
}

/// What a verified token grants, from its `mercure` claim.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Claims {
    /// `mercure.publish` selectors; None when absent (a publisher then gets 401).
    pub publish: Option<Vec<String>>,
    /// `mercure.subscribe` selectors; None when absent.
    pub subscribe: Option<Vec<String>>,
    /// `mercure.payload`, shown only in subscription events and the subscriptions API.
    pub payload: Option<serde_json::Value>,
    /// The token's `exp` (seconds since the epoch): the hub closes the stream then.
    pub exp: Option<u64>,
}

#[derive(Deserialize, Default)]
struct MercureClaim {
    publish: Option<Vec<String>>,
    subscribe: Option<Vec<String>>,
    payload: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawClaims {
    mercure: Option<MercureClaim>,
    #[serde(rename = "https://mercure.rocks/")]
    namespaced: Option<MercureClaim>,
    exp: Option<serde_json::Number>,
    nbf: Option<serde_json::Number>,
}

/// A NumericDate as whole seconds; fractions are truncated and negatives read as 0.
fn numeric_date(n: &serde_json::Number) -> u64 {
    n.as_u64().unwrap_or_else(|| n.as_f64().map_or(0, |f| if f > 0.0 { f as u64 } else { 0 }))
}

/// Verifies `token` with `key` at time `now` (seconds since the epoch) and returns its claims.
/// Only the key's algorithm is allowed. `exp` and `nbf` are checked here, not by jsonwebtoken,
/// because it would read the clock: expired when `now >= exp` (RFC 7519: "on or after"),
/// zero leeway; not yet valid when `now < nbf`. Neither is required. No aud/iss/sub checks.
pub fn verify(token: &str, key: &JwtKey, now: u64) -> Result<Claims, Error> {
    // An unknown alg (`none`) fails while reading the header: tell it apart from garbage.
    if let Err(e) = jsonwebtoken::decode_header(token) {
        return Err(match e.kind() {
            ErrorKind::Json(j) if j.to_string().contains("unknown variant") => {
                Error::unauthorized("algorithm not allowed")
            }
            _ => Error::unauthorized("malformed token"),
        });
    }
    let mut v = Validation::new(key.alg.jwt());
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.leeway = 0;
    v.required_spec_claims.clear();
    let data = jsonwebtoken::decode::<RawClaims>(token, &key.key, &v).map_err(|e| {
        Error::unauthorized(match e.kind() {
            ErrorKind::InvalidSignature => "invalid signature",
            ErrorKind::InvalidAlgorithm => "algorithm not allowed",
            ErrorKind::Json(_) => "invalid claims",
            ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => "malformed token",
            _ => "invalid token",
        })
    })?;
    let c = data.claims;
    let exp = c.exp.as_ref().map(numeric_date);
    if exp.is_some_and(|exp| now >= exp) {
        return Err(Error::unauthorized("token expired"));
    }
    if c.nbf.as_ref().map(numeric_date).is_some_and(|nbf| now < nbf) {
        return Err(Error::unauthorized("token not yet valid"));
    }
    let m = c.mercure.or(c.namespaced).unwrap_or_default();
    Ok(Claims { publish: m.publish, subscribe: m.subscribe, payload: m.payload, exp })
}

// ---------------------------------------------------------------------------------------------
// SSE framing

/// Encodes one SSE event. Every CR, LF or CRLF in `data` starts a new `data:` line, so a
/// browser joining the lines with LF gets `data` back with line ends normalized to LF.
/// `retry: 0` is never written, as in the Go hub (0 there means "not set").
pub fn event(id: &str, event_type: Option<&str>, retry: Option<u64>, data: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + id.len() + 32);
    if let Some(t) = event_type {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(t.as_bytes());
        out.push(b'\n');
    }
    if let Some(r) = retry.filter(|r| *r != 0) {
        out.extend_from_slice(format!("retry: {r}\n").as_bytes());
    }
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    let b = data.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\r' => {
                out.extend_from_slice(b"\ndata: ");
                if b.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\ndata: "),
            c => out.push(c),
        }
        i += 1;
    }
    out.extend_from_slice(b"\n\n");
    out
}

// ---------------------------------------------------------------------------------------------
// Subscriptions

/// Go's `url.QueryEscape`: unreserved kept, space as `+`, every other byte `%XX` (uppercase).
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(c as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{c:02X}")),
        }
    }
    out
}

/// The topic of a subscription's events and its id in the subscriptions API.
pub fn subscription_topic(topic_selector: &str, subscriber: &str) -> String {
    format!(
        "/.well-known/mercure/subscriptions/{}/{}",
        query_escape(topic_selector),
        query_escape(subscriber)
    )
}

/// One subscription as a JSON value (an item of [`subscriptions_collection`]).
pub fn subscription_value(
    topic_selector: &str,
    subscriber: &str,
    active: bool,
    payload: Option<&serde_json::Value>,
) -> serde_json::Value {
    serde_json::json!({
        "@context": "https://mercure.rocks/",
        "id": subscription_topic(topic_selector, subscriber),
        "type": "Subscription",
        "topic": topic_selector,
        "subscriber": subscriber,
        "active": active,
        "payload": payload,
    })
}

/// The body of a subscription event (published privately on [`subscription_topic`]).
pub fn subscription_json(
    topic_selector: &str,
    subscriber: &str,
    active: bool,
    payload: Option<&serde_json::Value>,
) -> String {
    subscription_value(topic_selector, subscriber, active, payload).to_string()
}

/// The body of a subscriptions API collection answer.
pub fn subscriptions_collection(id: &str, last_event_id: &str, items: &[serde_json::Value]) -> String {
    serde_json::json!({
        "@context": "https://mercure.rocks/",
        "id": id,
        "type": "Subscriptions",
        "lastEventID": last_event_id,
        "subscriptions": items,
    })
    .to_string()
}

/// Splits the path after `/.well-known/mercure/subscriptions` into (topic, subscriber), each
/// decoded as Go's `QueryUnescape`. `""` -> both None; empty segments or more than two -> 404.
pub fn parse_subscriptions_path(
    path_after_subscriptions: &str,
) -> Result<(Option<String>, Option<String>), Error> {
    const NOT_FOUND: Error = Error::new(404, "not found");
    if path_after_subscriptions.is_empty() {
        return Ok((None, None));
    }
    let rest = path_after_subscriptions.strip_prefix('/').ok_or(NOT_FOUND)?;
    let mut parts = rest.split('/');
    let topic = parts.next().filter(|s| !s.is_empty()).ok_or(NOT_FOUND)?;
    let subscriber = match parts.next() {
        None => None,
        Some("") => return Err(NOT_FOUND),
        Some(s) => Some(s),
    };
    if parts.next().is_some() {
        return Err(NOT_FOUND);
    }
    let topic = form_unescape(topic.as_bytes())?;
    let subscriber = subscriber.map(|s| form_unescape(s.as_bytes())).transpose()?;
    Ok((Some(topic), subscriber))
}

// ---------------------------------------------------------------------------------------------
// Ids

/// A fresh update or subscriber id, `urn:uuid:` + a random v4 UUID. v4 because a v7 would read
/// the clock here; use [`new_id_at`] for the time-ordered v7 the reference hub makes.
pub fn new_id() -> String {
    format!("urn:uuid:{}", uuid::Uuid::new_v4())
}

/// A fresh id, `urn:uuid:` + a v7 UUID stamped with `unix_ms` (milliseconds since the epoch).
pub fn new_id_at(unix_ms: u64) -> String {
    let ts = uuid::Timestamp::from_unix(
        uuid::NoContext,
        unix_ms / 1000,
        ((unix_ms % 1000) * 1_000_000) as u32,
    );
    format!("urn:uuid:{}", uuid::Uuid::new_v7(ts))
}

#[cfg(test)]
#[allow(clippy::type_complexity)] // tables of (input, expected) tuples are the house test style
mod tests {
    use super::*;

    const CONF_TOKEN: &str = "eyJhbGciOiJIUzI1NiJ9.eyJtZXJjdXJlIjp7InB1Ymxpc2giOlsiKiJdLCJzdWJzY3JpYmUiOlsiKiJdfX0.bVXdlWXwfw9ySx7-iV5OpUSHo34RkjUdVzDLBcc6l_g";
    const CONF_KEY: &str = "!ChangeThisMercureHubJWTSecretKey!";
    const RSA_PRIV: &str = "-----BEGIN PRIVATE KEY-----\nMIIEvwIBADANBgkqhkiG9w0BAQEFAASCBKkwggSlAgEAAoIBAQCH6fbstKeL8uE0\nCT8y+YSM3NWV1+L4rY04RwXkiPsG+ROy8iGJxfAVz0FwuNOBMA8yftnD9myZlsQi\npXdS9bw6Ya/TVfhltKQZhNjfW8TNSShSKXx+n/dW2xAUrEmfJtUMJ/CuDrlxaHR3\n1Z7uC5V3JIJ7VaSU0KXMUKYtPbVgD2XSIBngb9zgmKnRlCi5W7JZI8dBwkahVy0y\no0riSZrCoYa2Og7Un2XIRpMv/g7/lnM4NA5AjCUY7Ye25SohQxAlC6zhBnIPrP6w\nZGLgwq23oQCwdIN1A+FKbSTiiRdwjERXuXrf6I9PVjqsvitgLy5yjQAzEQM50tj6\nwA71jh/TAgMBAAECggEAAlxvpDQNNxKsk91XQjjwcwwBD93UvRIywlgFg69XgQsB\nqxmmuIB+R7q2fdFQJ03g7bUjblKRF2f1l059kKzhLLh2t/ql2op1UVYr+FFdTV2o\nfCjpVz/LKbCbimhlzQR9Lf1honxx/0TbxRsqbCM6YPv64k6eEdHAF5kNEfsg8/66\nAHVWPof92JR0tSRkZLGUZzN7jIoJ5mtJ5+dlJ1PNZGrE8L/06DrTxmILU/9qrT2j\ntwISz3UmmHj2U5V5SkaWXKtuxZYHc4QG6phbWVj3y9uyoIkdRW6Dyl89CAZ/ywJF\nqWdHefQC4CtHKbvev4LJnP27efip23NBigLqauDcIQKBgQC7p0oI0GulkvI+ON4N\nnOYK/NijUZxcPrL+Rc/20phEZgTwtK5MnjvgjDmFNIqHU7gJRBTTEq8O1GMurczi\n//ZJI665lal1drMrxqCW9kjTZbiUJAe/ri+SEUJV0aCet8fAE9peX/GDZZeqQxY2\nykPxvHzkrS9lV6HuD7P75O3eoQKBgQC5aoHP4jR5u4mS7KxRDr/VuvvvNEKZOKm7\nTh762vk+ByEr3n3IPd5nZMpzC8+R3fDctcWNzqUyrzjh2c6qWTRZcSnO+cjo6ZeT\nlp5e0G8G/kMoQHsy9U97NVaQuKUOIzkRGUY8Q9GIqxZL1B5YyUpvsO0JfRSV4CRT\n+pKOG7Gt8wKBgQCX+rcVSGfGo6qaBkihUc9mWr3CGBjBBO7GzRfPWWSFEPMzV8JK\nv2TTSf5UCeegDofgyUjsYhdxtUXWymBEAPYg6ktadwHV5prZ+3aYjUMSIzJImJ3F\n+ncAoAXPp4Wkxkd7Ixkaki3yM1eQR+E34r0AjZ3BPxpBw6WcPw+QFSspwQKBgQCF\nvPwLHScqkwmlT07vXIskN63WmMRczlEnCC8yU9WpVu0nPmFNmMqdm0aneuJqXUKJ\ngBcRtPbVOyv1Q+xcVOF8jjJQ1zyCO1MYonBzBTbAPY/lLbVvSR/eR9e7pWNwchmM\nasWNXIF7aaQ4Z7TH59DoBR7EVFMP08+AP2GMXQ9o3wKBgQCJXVypQkT0kHBUM2/G\nLTNddL6nioAdZj6QY62P3Rrqkgh1MwSjqug1xqmFMDT3MGOsThMh8ceiOrpqZF0p\n9lVbssIjFURzQ6A8nOBBL9pPZbBG9nzDbBIEVq5lKTHRp8uOhA7J/G1MMZu6H9gH\nldxd36q90NBGWn9nvAu9zQnHJw==\n-----END PRIVATE KEY-----\n";
    const RSA_PUB: &str = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAh+n27LSni/LhNAk/MvmE\njNzVldfi+K2NOEcF5Ij7BvkTsvIhicXwFc9BcLjTgTAPMn7Zw/ZsmZbEIqV3UvW8\nOmGv01X4ZbSkGYTY31vEzUkoUil8fp/3VtsQFKxJnybVDCfwrg65cWh0d9We7guV\ndySCe1WklNClzFCmLT21YA9l0iAZ4G/c4Jip0ZQouVuyWSPHQcJGoVctMqNK4kma\nwqGGtjoO1J9lyEaTL/4O/5ZzODQOQIwlGO2HtuUqIUMQJQus4QZyD6z+sGRi4MKt\nt6EAsHSDdQPhSm0k4okXcIxEV7l63+iPT1Y6rL4rYC8uco0AMxEDOdLY+sAO9Y4f\n0wIDAQAB\n-----END PUBLIC KEY-----\n";

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn publish_table() {
        let ok = |t: &[&str], d: &str, p: bool, id: Option<&str>, ty: Option<&str>, r: Option<u64>| {
            Ok(Publish {
                topics: s(t),
                data: d.into(),
                private: p,
                id: id.map(String::from),
                event_type: ty.map(String::from),
                retry: r,
            })
        };
        let cases: Vec<(&str, Result<Publish, u16>)> = vec![
            ("topic=a", ok(&["a"], "", false, None, None, None).map_err(|_: ()| 0)),
            ("topic=a&topic=b&data=x+y%21", ok(&["a", "b"], "x y!", false, None, None, None).map_err(|_: ()| 0)),
            ("topic=a&&b&data=1&data=2", ok(&["a"], "1", false, None, None, None).map_err(|_: ()| 0)),
            ("topic=&private", ok(&[""], "", true, None, None, None).map_err(|_: ()| 0)),
            ("topic=a&private=on&id=x&type=t&retry=10&zz=1", ok(&["a"], "", true, Some("x"), Some("t"), Some(10)).map_err(|_: ()| 0)),
            ("topic=a&id=&type=&retry=", ok(&["a"], "", false, None, None, None).map_err(|_: ()| 0)),
            ("topic=a&data=l1%0Al2%0D%0A", ok(&["a"], "l1\nl2\r\n", false, None, None, None).map_err(|_: ()| 0)),
            ("", Err(400)),
            ("data=x", Err(400)),
            ("topic=a&id=%23x", Err(400)),
            ("topic=a&id=a%0Ab", Err(400)),
            ("topic=a&id=a%0Db", Err(400)),
            ("topic=a&type=a%0Ab", Err(400)),
            ("topic=a&retry=-1", Err(400)),
            ("topic=a&retry=%2B1", Err(400)),
            ("topic=a&retry=1.5", Err(400)),
            ("topic=a&retry=99999999999999999999999", Err(400)),
            ("topic=a%ZZ", Err(400)),
            ("topic=a%4", Err(400)),
            ("topic=%FF", Err(400)),
            ("topic=a%00", Err(400)),
            ("topic=https://x/.well-known/mercure/subscriptions", Err(403)),
        ];
        for (body, want) in cases {
            let got = parse_publish(body.as_bytes(), MAX_TOPICS).map_err(|e| e.status);
            assert_eq!(got, want, "body {body:?}");
        }
    }

    #[test]
    fn publish_topic_count() {
        let body = |n: usize| vec!["topic=t"; n].join("&");
        assert_eq!(parse_publish(body(1000).as_bytes(), 1000).map(|p| p.topics.len()), Ok(1000));
        assert_eq!(parse_publish(body(1001).as_bytes(), 1000).map_err(|e| e.status), Err(400));
        assert_eq!(parse_publish(body(3).as_bytes(), 2).map_err(|e| e.status), Err(400));
    }

    #[test]
    fn publish_split_at_every_byte_never_panics() {
        let body = b"topic=a%20b&data=x%0Ay&id=i&retry=5";
        for i in 0..=body.len() {
            let _ = parse_publish(&body[..i], MAX_TOPICS);
        }
    }

    #[test]
    fn subscribe_table() {
        let cases: Vec<(&str, Result<(Vec<String>, Option<&str>, Option<&str>), u16>)> = vec![
            ("topic=a&topic=b", Ok((s(&["a", "b"]), None, None))),
            ("topic=a&lastEventID=1&Last-Event-ID=2", Ok((s(&["a"]), Some("1"), None))),
            ("topic=a&Last-Event-ID=2&lastEventID=1", Ok((s(&["a"]), Some("1"), None))),
            ("topic=a&Last-Event-ID=2", Ok((s(&["a"]), Some("2"), None))),
            ("topic=a&authorization=jwt", Ok((s(&["a"]), None, Some("jwt")))),
            ("topic=https%3A%2F%2Fx%2F%7Bid%7D", Ok((s(&["https://x/{id}"]), None, None))),
            ("", Err(400)),
            ("lastEventID=1", Err(400)),
            ("topic=%G0", Err(400)),
        ];
        for (q, want) in cases {
            let got = parse_subscribe(q)
                .map(|r| (r.topics, r.last_event_id, r.authorization))
                .map_err(|e| e.status);
            let want = want.map(|(t, l, a)| (t, l.map(String::from), a.map(String::from)));
            assert_eq!(got, want, "query {q:?}");
        }
        let many = vec!["topic=t"; 1001].join("&");
        assert_eq!(parse_subscribe(&many).map_err(|e| e.reason), Err("too many topics"));
        assert_eq!(parse_subscribe("").map_err(|e| e.reason), Err(r#"Missing "topic" parameter."#));
    }

    #[test]
    fn selector_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "anything", true),
            ("*", "", true),
            ("foo", "foo", true),
            ("foo", "foobar", false),
            ("https://example.com/books/{id}", "https://example.com/books/1", true),
            ("https://example.com/books/{id}", "https://example.com/books/1/reviews", false),
            ("https://example.com/books/{id}", "https://example.com/authors/1", false),
            ("https://example.com/books/{id}", "https://example.com/books/", false),
            ("https://example.com/books/{id}", "https://example.com/books/{id}", true),
            ("https://example.com/books/{id}", "https://example.com/books/a%20b", true),
            ("https://example.com/books/{id}", "https://example.com/books/a?x", false),
            ("https://example.net/foo/{random}", "https://example.net/foo/bar", true),
            ("https://example.net/foo/{random}", "https://example.net/foo/bar#x", false),
            ("https://x/{+path}", "https://x/a/b?c#d", true),
            ("https://x/a{#frag}", "https://x/a#f/g", true),
            ("https://x/a{#frag}", "https://x/a", true),
            ("https://x/books{/id}", "https://x/books/1", true),
            ("https://x/books{/id}", "https://x/books/1/2", false),
            ("https://x/books{/id*}", "https://x/books/1/2", true),
            ("https://x/books{/a,b}", "https://x/books/1/2", true),
            ("https://x/f{.ext}", "https://x/f.json", true),
            ("https://x/m{;p}", "https://x/m;p=1", true),
            ("https://x/s{?q,page}", "https://x/s?q=a&page=2", true),
            ("https://x/s{?q}{&page}", "https://x/s?q=a&page=2", true),
            ("https://x/{a,b}", "https://x/1,2", true),
            ("https://x/{a:3}", "https://x/abcdef", true),
            ("https://x/{a}.{b}", "https://x/1.2", true),
            ("a.b{x}", "aXb1", false), // literal '.' is escaped
            ("https://x/{id", "https://x/{id", true), // malformed: exact only
            ("https://x/{id", "https://x/1", false),
            ("https://x/id}", "https://x/id}", true),
            ("https://x/{}", "https://x/1", false),
            ("https://x/{a{b}}", "https://x/1", false),
            ("https://x/{!a}", "https://x/1", false),
        ];
        for (sel, topic, want) in cases {
            assert_eq!(Selector::new(sel).matches(topic), *want, "{sel} vs {topic}");
        }
    }

    #[test]
    fn selector_accessors() {
        let cases: &[(&str, Option<&str>)] = &[
            ("*", None),
            ("foo", Some("foo")),
            ("https://x/{id}", None),
            ("https://x/{id", Some("https://x/{id")),
        ];
        for (sel, exact) in cases {
            let s = Selector::new(sel);
            assert_eq!(s.is_exact(), *exact, "{sel}");
            assert_eq!(s.as_str(), *sel);
        }
    }

    #[test]
    fn authorization_table() {
        let cases: &[(&[&str], &[&str], bool, bool)] = &[
            // (claim selectors, update topics, can_publish, can_receive)
            (&["*"], &["a", "b"], true, true),
            (&["a"], &["a", "b"], false, true),
            (&["a", "b"], &["a", "b"], true, true),
            (&["https://x/{id}"], &["https://x/1"], true, true),
            (&["c"], &["a", "b"], false, false),
            (&[], &["a"], false, false),
        ];
        for (claim, topics, publish, receive) in cases {
            assert_eq!(can_publish(&s(claim), &s(topics)), *publish, "{claim:?} {topics:?}");
            assert_eq!(can_receive(&selectors(&s(claim)), &s(topics)), *receive, "{claim:?} {topics:?}");
        }
    }

    fn sign(alg: Algorithm, key: &jsonwebtoken::EncodingKey, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, key).expect("sign")
    }

    #[test]
    fn jwt_table() {
        let hs = JwtKey::new(Alg::HS256, CONF_KEY).expect("key");
        let enc = jsonwebtoken::EncodingKey::from_secret(CONF_KEY.as_bytes());
        let other = jsonwebtoken::EncodingKey::from_secret(b"another secret");
        let m = serde_json::json!({"publish": ["a"], "subscribe": ["b"], "payload": {"u": 1}});
        // alg none, built by hand: base64url({"alg":"none"}) . base64url({"mercure":{...}}) .
        let none = "eyJhbGciOiJub25lIn0.eyJtZXJjdXJlIjp7InB1Ymxpc2giOlsiKiJdfX0.";
        let cases: Vec<(String, Result<Claims, &str>)> = vec![
            (CONF_TOKEN.into(), Ok(Claims { publish: Some(s(&["*"])), subscribe: Some(s(&["*"])), ..Claims::default() })),
            (sign(Algorithm::HS256, &enc, serde_json::json!({"mercure": m, "exp": 2000})),
             Ok(Claims { publish: Some(s(&["a"])), subscribe: Some(s(&["b"])), payload: Some(serde_json::json!({"u": 1})), exp: Some(2000) })),
            (sign(Algorithm::HS256, &enc, serde_json::json!({"https://mercure.rocks/": {"subscribe": ["z"]}})),
             Ok(Claims { subscribe: Some(s(&["z"])), ..Claims::default() })),
            (sign(Algorithm::HS256, &enc, serde_json::json!({"sub": "x", "aud": "y", "iss": "z"})), Ok(Claims::default())),
            (sign(Algorithm::HS256, &enc, serde_json::json!({"exp": 1000})), Err("token expired")),
            (sign(Algorithm::HS256, &enc, serde_json::json!({"exp": 999})), Err("token expired")),
            (sign(Algorithm::HS256, &enc, serde_json::json!({"nbf": 1001})), Err("token not yet valid")),
            (sign(Algorithm::HS256, &enc, serde_json::json!({"nbf": 1000})), Ok(Claims::default())),
            (sign(Algorithm::HS256, &other, serde_json::json!({})), Err("invalid signature")),
            (sign(Algorithm::HS512, &enc, serde_json::json!({})), Err("algorithm not allowed")),
            (sign(Algorithm::HS256, &enc, serde_json::json!({"mercure": {"publish": "a"}})), Err("invalid claims")),
            (none.into(), Err("algorithm not allowed")),
            ("garbage".into(), Err("malformed token")),
            ("a.b.c".into(), Err("malformed token")),
            ("".into(), Err("malformed token")),
        ];
        for (tok, want) in cases {
            let got = verify(&tok, &hs, 1000);
            if let Err(e) = &got {
                assert_eq!(e.status, 401);
            }
            assert_eq!(got.map_err(|e| e.reason), want, "token {tok}");
        }
    }

    #[test]
    fn jwt_rs256() {
        let key = JwtKey::new(Alg::RS256, RSA_PUB).expect("rsa key");
        let enc = jsonwebtoken::EncodingKey::from_rsa_pem(RSA_PRIV.as_bytes()).expect("priv");
        let tok = sign(Algorithm::RS256, &enc, serde_json::json!({"mercure": {"publish": ["*"]}}));
        assert_eq!(verify(&tok, &key, 0).map(|c| c.publish), Ok(Some(s(&["*"]))));
        // An HS256 token signed with the public key text (the classic confusion attack).
        let hs = jsonwebtoken::EncodingKey::from_secret(RSA_PUB.as_bytes());
        let forged = sign(Algorithm::HS256, &hs, serde_json::json!({}));
        assert_eq!(verify(&forged, &key, 0).map_err(|e| e.reason), Err("algorithm not allowed"));
        // Wrong key: the HS256 key refuses an RS256 token.
        let hk = JwtKey::new(Alg::HS256, "secret").expect("key");
        assert_eq!(verify(&tok, &hk, 0).map_err(|e| e.reason), Err("algorithm not allowed"));
    }

    #[test]
    fn jwt_key_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("HS256", "secret", true),
            ("hs512", "secret", true),
            ("HS256", "", false),
            ("RS256", RSA_PUB, true),
            ("RS256", RSA_PRIV, false),
            ("RS256", "not a pem", false),
            ("ES256", RSA_PUB, false),
        ];
        for (alg, key, ok) in cases {
            let alg: Alg = alg.parse().expect("alg");
            assert_eq!(JwtKey::new(alg, key).is_ok(), *ok, "{alg:?}");
        }
        assert!("none".parse::<Alg>().is_err());
        assert!("PS256".parse::<Alg>().is_err());
    }

    /// What a browser's EventSource does with one event: join data lines with LF.
    fn browser_data(ev: &[u8]) -> String {
        let text = String::from_utf8(ev.to_vec()).expect("utf8");
        let lines: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        lines.join("\n")
    }

    #[test]
    fn event_table() {
        let cases: &[(&str, Option<&str>, Option<u64>, &str, &str)] = &[
            ("1", None, None, "", "id: 1\ndata: \n\n"),
            ("1", None, None, "x", "id: 1\ndata: x\n\n"),
            ("1", Some("t"), Some(5), "x", "event: t\nretry: 5\nid: 1\ndata: x\n\n"),
            ("1", None, Some(0), "x", "id: 1\ndata: x\n\n"),
            ("1", None, None, "a\n\n  b", "id: 1\ndata: a\ndata: \ndata:   b\n\n"),
            ("1", None, None, "a\r\nb\rc\n", "id: 1\ndata: a\ndata: b\ndata: c\ndata: \n\n"),
            ("1", None, None, "\r\r\n", "id: 1\ndata: \ndata: \ndata: \n\n"),
        ];
        for (id, ty, retry, data, want) in cases {
            let got = event(id, *ty, *retry, data);
            assert_eq!(String::from_utf8_lossy(&got), *want, "data {data:?}");
            let normalized = data.replace("\r\n", "\n").replace('\r', "\n");
            assert_eq!(browser_data(&got), normalized, "round trip {data:?}");
        }
    }

    #[test]
    fn subscription_table() {
        let cases: &[(&str, &str, &str)] = &[
            ("a", "urn:uuid:1", "/.well-known/mercure/subscriptions/a/urn%3Auuid%3A1"),
            ("https://x/{id}", "s", "/.well-known/mercure/subscriptions/https%3A%2F%2Fx%2F%7Bid%7D/s"),
            ("a b~-_.", "é", "/.well-known/mercure/subscriptions/a+b~-_./%C3%A9"),
        ];
        for (t, sub, want) in cases {
            assert_eq!(subscription_topic(t, sub), *want);
            let back = want.strip_prefix("/.well-known/mercure/subscriptions").expect("prefix");
            assert_eq!(parse_subscriptions_path(back), Ok((Some(t.to_string()), Some(sub.to_string()))));
        }
        assert_eq!(
            subscription_json("a", "s", true, None),
            r#"{"@context":"https://mercure.rocks/","active":true,"id":"/.well-known/mercure/subscriptions/a/s","payload":null,"subscriber":"s","topic":"a","type":"Subscription"}"#
        );
        let v: serde_json::Value = serde_json::from_str(&subscription_json("a", "s", false, Some(&serde_json::json!({"u": 1})))).expect("json");
        assert_eq!(v["payload"]["u"], 1);
        assert_eq!(v["active"], false);
        let c: serde_json::Value = serde_json::from_str(&subscriptions_collection("/x", "e1", std::slice::from_ref(&v))).expect("json");
        assert_eq!((c["type"].as_str(), c["lastEventID"].as_str(), c["id"].as_str()), (Some("Subscriptions"), Some("e1"), Some("/x")));
        assert_eq!(c["subscriptions"][0], v);
    }

    #[test]
    fn subscriptions_path_table() {
        let cases: &[(&str, Result<(Option<&str>, Option<&str>), u16>)] = &[
            ("", Ok((None, None))),
            ("/a", Ok((Some("a"), None))),
            ("/a+b/c%2Fd", Ok((Some("a b"), Some("c/d")))),
            ("/", Err(404)),
            ("/a/", Err(404)),
            ("/a/b/c", Err(404)),
            ("a", Err(404)),
            ("//b", Err(404)),
            ("/%ZZ", Err(400)),
        ];
        for (p, want) in cases {
            let want = want.map(|(a, b)| (a.map(String::from), b.map(String::from)));
            assert_eq!(parse_subscriptions_path(p).map_err(|e| e.status), want, "{p:?}");
        }
    }

    #[test]
    fn ids() {
        let a = new_id();
        assert!(a.starts_with("urn:uuid:") && a.len() == 45, "{a}");
        assert_ne!(a, new_id());
        let b = new_id_at(1_700_000_000_123);
        let u = uuid::Uuid::parse_str(&b["urn:uuid:".len()..]).expect("uuid");
        assert_eq!(u.get_version_num(), 7);
        assert!(new_id_at(1) < new_id_at(2_000_000_000_000));
    }

    #[test]
    fn error_display() {
        assert_eq!(Error::bad("x").to_string(), "400 x");
    }
}

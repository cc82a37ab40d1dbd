//! The configuration: `server.toml` is read into a raw serde struct that refuses unknown keys
//! (a typo must not silently fall back to a default), then checked into a validated [`Config`]
//! whose fields the rest of the daemon trusts without further checks. Every error names the key
//! and the problem, so an operator can fix the file from the message alone.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Log level: 0 error, 1 warn, 2 info, 3 debug (`RUST_LOG` wins over the file).
    pub log_level: u8,
    /// Browser (long-poll) listener settings.
    pub browser: Browser,
    /// Control socket (RESP) address.
    pub control_listen: SocketAddr,
    /// Backend tokens: name -> secret. Empty means no authentication is asked.
    pub tokens: BTreeMap<String, String>,
    /// Admin HTTP listener address.
    pub admin_listen: SocketAddr,
    /// Per-channel buffer limits.
    pub channels: Channels,
    /// Caps on what a peer may send or hold.
    pub limits: Limits,
    /// The worker pool for blocking work.
    pub workers: Workers,
    /// Access checks.
    pub auth: Auth,
    /// Presence tracking.
    pub presence: PresenceCfg,
    /// The message store: file and durability; None = memory only.
    pub store: Option<(PathBuf, crate::store::Fsync)>,
    /// Several nodes as one service through Redis; None = a single node, no Redis at all.
    pub cluster: Option<Cluster>,
    /// The Mercure hub at `/.well-known/mercure`; None = not served.
    pub mercure: Option<MercureCfg>,
}

/// The Mercure hub (`[mercure]`).
#[derive(Debug, Clone)]
pub struct MercureCfg {
    /// The key publishers' JWTs are verified with, and its algorithm.
    pub publisher_key: crate::mercure::JwtKey,
    /// The key subscribers' JWTs are verified with, and its algorithm.
    pub subscriber_key: crate::mercure::JwtKey,
    /// Subscribers without a JWT get public updates (else 401).
    pub anonymous: bool,
    /// Origins allowed by CORS (with credentials); `*` echoes any.
    pub cors_origins: Vec<String>,
    /// Origins a cookie-authorized publish may come from.
    pub publish_origins: Vec<String>,
    /// Subscription events and the subscriptions API.
    pub subscriptions: bool,
    /// Updates kept for resume (`Last-Event-ID`), all topics together.
    pub history: usize,
    /// Interval of the `:` comment that keeps an idle stream open.
    pub heartbeat: Duration,
    /// The cookie a browser's JWT may come in.
    pub cookie_name: String,
    /// A key is still a shipped example (`--check` warns).
    pub placeholder_key: bool,
}

/// The cluster: where Redis is and who this node is in it.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// redis-server's address.
    pub redis: SocketAddr,
    /// Its AUTH password; empty = none.
    pub password: String,
    /// This node's name, unique in the cluster.
    pub node: String,
    /// The prefix of every key and pub/sub channel comet uses in Redis.
    pub prefix: String,
}

/// Presence tracking.
#[derive(Debug, Clone)]
pub struct PresenceCfg {
    /// How long a session stays online (and on a channel) after its last poll ended.
    pub grace: Duration,
    /// SQLite database to keep presence rows in; None = off.
    pub database: Option<PathBuf>,
    /// Table for the rows.
    pub table: String,
    /// This daemon's name in the rows' `daemon` column; its old rows are deleted at start.
    pub instance: String,
}

/// The worker pool.
#[derive(Debug, Clone, Copy)]
pub struct Workers {
    /// Worker threads.
    pub threads: usize,
    /// Jobs waiting at most; beyond it a request gets `503` at once.
    pub queue: usize,
    /// Longest a browser waits for a job's answer before `504`.
    pub job_timeout: Duration,
}

/// How a poll on a shared channel is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Every shared channel is open.
    None,
    /// Queries on the application's SQLite database.
    Sqlite,
    /// A request to the application server.
    Http,
    /// Only a signed key (or an open pattern) allows.
    Key,
}

impl AuthMode {
    /// The name as written in `server.toml`.
    pub fn name(self) -> &'static str {
        match self {
            AuthMode::None => "none",
            AuthMode::Sqlite => "sqlite",
            AuthMode::Http => "http",
            AuthMode::Key => "key",
        }
    }
}

/// Access checks.
#[derive(Debug, Clone)]
pub struct Auth {
    /// The mode.
    pub mode: AuthMode,
    /// SQLite database file (mode sqlite).
    pub database: PathBuf,
    /// Query with `:sid`; a row means a valid session, its first column the user id.
    pub session_query: String,
    /// Query with `:channel` and `:user` (and optionally `:sid`); a row means allowed.
    pub channel_query: String,
    /// Callback URL (mode http).
    pub url: String,
    /// Channel patterns anyone may read without a check (`*` matches any run of characters).
    pub open_channels: Vec<String>,
    /// How long an answer (allowed or denied) is reused.
    pub cache_ttl: Duration,
    /// Most cached answers; the oldest go first.
    pub cache_max_entries: usize,
    /// Secret for signed subscribe keys; empty disables them.
    pub key_secret: String,
}

/// Browser listener settings.
#[derive(Debug, Clone)]
pub struct Browser {
    /// Address of the long-poll listener.
    pub listen: SocketAddr,
    /// Name of the cookie holding the session id.
    pub session_cookie: String,
    /// How long a poll is held before `408`.
    pub poll_timeout: Duration,
    /// Origins allowed by CORS; `*` allows any.
    pub allowed_origins: Vec<String>,
    /// What a poll without a cursor gets first.
    pub first_message: FirstMessage,
    /// Keep-alive interval of EventSource and WebSocket streams (a comment, a Ping); None: off.
    pub stream_ping: Option<Duration>,
    /// Listen with SO_REUSEPORT, so several nodes on one host can share the ports.
    pub reuse_port: bool,
}

/// What a poll without a cursor gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstMessage {
    /// The oldest buffered message (nchan's default).
    Oldest,
    /// The next message published after the request.
    Newest,
}

/// Per-channel buffer limits.
#[derive(Debug, Clone, Copy)]
pub struct Channels {
    /// Messages kept per channel.
    pub buffer_length: usize,
    /// Age after which a buffered message is dropped, in seconds.
    pub message_ttl_secs: u64,
}

/// Caps on peers.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest HTTP request head.
    pub max_head_bytes: usize,
    /// Largest message (HTTP body or RESP bulk).
    pub max_message_bytes: usize,
    /// Longest channel id.
    pub max_channel_id_bytes: usize,
    /// Output bytes queued for one connection before it is cut as a slow reader.
    pub max_output_bytes: usize,
    /// Connections held at once; above it new ones get `503` (HTTP) or an error (RESP).
    pub max_connections: usize,
    /// Time for a request head to arrive, from its first byte.
    pub head_timeout: Duration,
    /// Time an idle keep-alive browser or admin connection is kept between requests.
    pub idle_timeout: Duration,
    /// Failed token checks from one address within a minute before it is refused.
    pub auth_max_failures: u32,
    /// How long such an address is refused.
    pub auth_penalty: Duration,
}

/// A configuration error: the key and what is wrong with it.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(key: &str, problem: impl fmt::Display) -> Result<T, ConfigError> {
    Err(ConfigError(format!("{key}: {problem}")))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Raw {
    log: RawLog,
    browser: RawBrowser,
    control: RawControl,
    admin: RawAdmin,
    channels: RawChannels,
    limits: RawLimits,
    workers: RawWorkers,
    auth: RawAuth,
    presence: RawPresence,
    store: RawStore,
    cluster: RawCluster,
    mercure: Option<RawMercure>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMercure {
    publisher_jwt_key: String,
    publisher_jwt_alg: String,
    subscriber_jwt_key: String,
    subscriber_jwt_alg: String,
    anonymous: bool,
    cors_origins: Vec<String>,
    publish_origins: Vec<String>,
    subscriptions: bool,
    history: u64,
    heartbeat_secs: u64,
    cookie_name: String,
}

impl Default for RawMercure {
    fn default() -> Self {
        RawMercure {
            publisher_jwt_key: String::new(),
            publisher_jwt_alg: "HS256".into(),
            subscriber_jwt_key: String::new(),
            subscriber_jwt_alg: "HS256".into(),
            anonymous: false,
            cors_origins: Vec::new(),
            publish_origins: Vec::new(),
            subscriptions: false,
            history: 1000,
            heartbeat_secs: 40,
            cookie_name: "mercureAuthorization".into(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawCluster {
    redis: String,
    password: String,
    node: String,
    prefix: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    path: String,
    fsync: String,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore { path: String::new(), fsync: "everysec".into() }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPresence {
    grace_secs: u64,
    database: String,
    table: String,
    instance: String,
}

impl Default for RawPresence {
    fn default() -> Self {
        RawPresence { grace_secs: 15, database: String::new(), table: "comet_online".into(), instance: "comet".into() }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawWorkers {
    threads: u64,
    queue: u64,
    job_timeout_ms: u64,
}

impl Default for RawWorkers {
    fn default() -> Self {
        RawWorkers { threads: 4, queue: 1024, job_timeout_ms: 5000 }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAuth {
    mode: String,
    database: String,
    session_query: String,
    channel_query: String,
    url: String,
    open_channels: Vec<String>,
    cache_ttl_secs: u64,
    cache_max_entries: u64,
    key_secret: String,
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            mode: "none".into(),
            database: String::new(),
            session_query: String::new(),
            channel_query: String::new(),
            url: String::new(),
            open_channels: Vec::new(),
            cache_ttl_secs: 10,
            cache_max_entries: 100_000,
            key_secret: String::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog { level: "info".into() }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawBrowser {
    listen: String,
    session_cookie: String,
    poll_timeout_secs: u64,
    allowed_origins: Vec<String>,
    first_message: String,
    stream_ping_secs: u64,
    reuse_port: bool,
}

impl Default for RawBrowser {
    fn default() -> Self {
        RawBrowser {
            listen: "127.0.0.1:8100".into(),
            session_cookie: "PHPSESSID".into(),
            poll_timeout_secs: 30,
            allowed_origins: Vec::new(),
            first_message: "oldest".into(),
            stream_ping_secs: 15,
            reuse_port: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawControl {
    listen: String,
    tokens: BTreeMap<String, String>,
}

impl Default for RawControl {
    fn default() -> Self {
        RawControl { listen: "127.0.0.1:8101".into(), tokens: BTreeMap::new() }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin { listen: "127.0.0.1:8102".into() }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawChannels {
    buffer_length: u64,
    message_ttl_secs: u64,
}

impl Default for RawChannels {
    fn default() -> Self {
        RawChannels { buffer_length: 100, message_ttl_secs: 3600 }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_head_bytes: u64,
    max_message_bytes: u64,
    max_channel_id_bytes: u64,
    max_output_bytes: u64,
    max_connections: u64,
    head_timeout_secs: u64,
    idle_timeout_secs: u64,
    auth_max_failures: u64,
    auth_penalty_secs: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_head_bytes: 8192,
            max_message_bytes: 1 << 20,
            max_channel_id_bytes: 128,
            max_output_bytes: 4 << 20,
            max_connections: 19_000,
            head_timeout_secs: 10,
            idle_timeout_secs: 120,
            auth_max_failures: 10,
            auth_penalty_secs: 30,
        }
    }
}

/// Parses a log level name as `RUST_LOG` or the file gives it.
pub fn parse_level(s: &str) -> Option<u8> {
    match s.trim().to_ascii_lowercase().as_str() {
        "error" => Some(0),
        "warn" | "warning" => Some(1),
        "info" => Some(2),
        "debug" | "trace" => Some(3),
        _ => None,
    }
}

fn addr(key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    // An IP and a port only: a host name would need DNS, which the daemon never does.
    s.parse().or_else(|_| err(key, format!("{s:?} is not an IP:port address (e.g. \"127.0.0.1:8100\")")))
}

fn range(key: &str, v: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    if v < min || v > max {
        return err(key, format!("{v} is out of range ({min} to {max})"));
    }
    Ok(v)
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        Config::parse(&text).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    /// Parses and validates a configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError(e.to_string().trim_end().to_string()))?;
        Config::validate(raw)
    }

    fn validate(raw: Raw) -> Result<Config, ConfigError> {
        let log_level = match parse_level(&raw.log.level) {
            Some(l) => l,
            None => return err("log.level", format!("{:?} is not one of error, warn, info, debug", raw.log.level)),
        };
        let b = raw.browser;
        let cookie = b.session_cookie.trim().to_string();
        if cookie.is_empty() || !cookie.bytes().all(|c| c.is_ascii_graphic() && !b"=;,\"".contains(&c)) {
            return err("browser.session_cookie", format!("{:?} is not a cookie name", b.session_cookie));
        }
        for o in &b.allowed_origins {
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                return err(
                    "browser.allowed_origins",
                    format!("{o:?} is not an origin (\"https://site.com\", no path, or \"*\")"),
                );
            }
        }
        let first_message = match b.first_message.as_str() {
            "oldest" => FirstMessage::Oldest,
            "newest" => FirstMessage::Newest,
            other => return err("browser.first_message", format!("{other:?} is not \"oldest\" or \"newest\"")),
        };
        let browser = Browser {
            listen: addr("browser.listen", &b.listen)?,
            session_cookie: cookie,
            poll_timeout: Duration::from_secs(range("browser.poll_timeout_secs", b.poll_timeout_secs, 1, 86_400)?),
            allowed_origins: b.allowed_origins,
            first_message,
            stream_ping: match range("browser.stream_ping_secs", b.stream_ping_secs, 0, 3600)? {
                0 => None,
                n => Some(Duration::from_secs(n)),
            },
            reuse_port: b.reuse_port,
        };
        for (name, secret) in &raw.control.tokens {
            if name.is_empty() || !name.bytes().all(|c| c.is_ascii_graphic()) {
                return err("control.tokens", format!("token name {name:?} must be printable ASCII without spaces"));
            }
            if secret.len() < 8 {
                return err(&format!("control.tokens.{name}"), "a secret needs at least 8 characters");
            }
        }
        let control_listen = addr("control.listen", &raw.control.listen)?;
        let admin_listen = addr("admin.listen", &raw.admin.listen)?;
        if raw.control.tokens.is_empty() {
            // Without a token anyone who reaches these ports can publish to every browser.
            if !control_listen.ip().is_loopback() {
                return err("control.listen", format!("{control_listen} is not a loopback address and [control.tokens] is empty: add a token"));
            }
            if !admin_listen.ip().is_loopback() {
                return err("admin.listen", format!("{admin_listen} is not a loopback address and [control.tokens] is empty: add a token"));
            }
        }
        let c = raw.channels;
        let channels = Channels {
            buffer_length: range("channels.buffer_length", c.buffer_length, 1, 1_000_000)? as usize,
            message_ttl_secs: range("channels.message_ttl_secs", c.message_ttl_secs, 1, 365 * 86_400)?,
        };
        let l = raw.limits;
        let limits = Limits {
            max_head_bytes: range("limits.max_head_bytes", l.max_head_bytes, 1024, 1 << 20)? as usize,
            max_message_bytes: range("limits.max_message_bytes", l.max_message_bytes, 1, 64 << 20)? as usize,
            max_channel_id_bytes: range("limits.max_channel_id_bytes", l.max_channel_id_bytes, 8, 1024)? as usize,
            max_output_bytes: range("limits.max_output_bytes", l.max_output_bytes, 4096, 1 << 30)? as usize,
            max_connections: range("limits.max_connections", l.max_connections, 1, 10_000_000)? as usize,
            head_timeout: Duration::from_secs(range("limits.head_timeout_secs", l.head_timeout_secs, 1, 3600)?),
            idle_timeout: Duration::from_secs(range("limits.idle_timeout_secs", l.idle_timeout_secs, 1, 86_400)?),
            auth_max_failures: range("limits.auth_max_failures", l.auth_max_failures, 1, 1_000_000)? as u32,
            auth_penalty: Duration::from_secs(range("limits.auth_penalty_secs", l.auth_penalty_secs, 0, 86_400)?),
        };
        if limits.max_output_bytes < limits.max_message_bytes + 4096 {
            return err("limits.max_output_bytes", "must exceed limits.max_message_bytes by at least 4096 (one message must fit)");
        }
        let w = raw.workers;
        let workers = Workers {
            threads: range("workers.threads", w.threads, 1, 256)? as usize,
            queue: range("workers.queue", w.queue, 1, 1_000_000)? as usize,
            job_timeout: Duration::from_millis(range("workers.job_timeout_ms", w.job_timeout_ms, 10, 600_000)?),
        };
        let auth = Config::validate_auth(raw.auth)?;
        let p = raw.presence;
        if p.table.is_empty() || p.table.len() > 64 || !p.table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') || p.table.as_bytes()[0].is_ascii_digit() {
            return err("presence.table", format!("{:?} is not a plain SQL table name (letters, digits, _)", p.table));
        }
        let presence = PresenceCfg {
            grace: Duration::from_secs(range("presence.grace_secs", p.grace_secs, 1, 3600)?),
            database: (!p.database.is_empty()).then(|| PathBuf::from(p.database)),
            table: p.table,
            instance: p.instance,
        };
        let fsync = match raw.store.fsync.as_str() {
            "always" => crate::store::Fsync::Always,
            "everysec" => crate::store::Fsync::EverySec,
            "no" => crate::store::Fsync::No,
            other => return err("store.fsync", format!("{other:?} is not \"always\", \"everysec\" or \"no\"")),
        };
        let store = (!raw.store.path.is_empty()).then(|| (PathBuf::from(raw.store.path), fsync));
        let cluster = Config::validate_cluster(raw.cluster, browser.listen.port())?;
        if cluster.is_some() && store.is_some() {
            return err("store.path", "cannot be set with [cluster]: in a cluster Redis keeps the channel buffers");
        }
        let mut presence = presence;
        if let Some(c) = &cluster {
            // Each node writes its own presence rows and, finding another dead, deletes that
            // node's: the daemon column must name the node.
            if presence.instance == "comet" {
                presence.instance = c.node.clone();
            }
        }
        let mercure = raw.mercure.map(Config::validate_mercure).transpose()?;
        Ok(Config {
            mercure,
            store,
            cluster,
            presence,
            workers,
            auth,
            log_level,
            browser,
            control_listen,
            tokens: raw.control.tokens,
            admin_listen,
            channels,
            limits,
        })
    }
}

impl Config {
    fn validate_mercure(m: RawMercure) -> Result<MercureCfg, ConfigError> {
        let key = |name: &str, key: &str, alg_name: &str, alg: &str| -> Result<crate::mercure::JwtKey, ConfigError> {
            if key.is_empty() {
                return err(name, "must be set: the key JWTs are verified with");
            }
            let Ok(a) = alg.parse::<crate::mercure::Alg>() else {
                return err(alg_name, format!("{alg:?} is not one of HS256, HS384, HS512, RS256, RS384, RS512, ES256, ES384"));
            };
            crate::mercure::JwtKey::new(a, key).or_else(|e| err(name, e))
        };
        let publisher_key = key("mercure.publisher_jwt_key", &m.publisher_jwt_key, "mercure.publisher_jwt_alg", &m.publisher_jwt_alg)?;
        let subscriber_key = key("mercure.subscriber_jwt_key", &m.subscriber_jwt_key, "mercure.subscriber_jwt_alg", &m.subscriber_jwt_alg)?;
        for (name, list) in [("mercure.cors_origins", &m.cors_origins), ("mercure.publish_origins", &m.publish_origins)] {
            for o in list {
                if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                    return err(name, format!("{o:?} is not an origin (\"https://site.com\", no path, or \"*\")"));
                }
            }
        }
        let cookie = m.cookie_name.trim().to_string();
        if cookie.is_empty() || !cookie.bytes().all(|c| c.is_ascii_graphic() && !b"=;,\"".contains(&c)) {
            return err("mercure.cookie_name", format!("{:?} is not a cookie name", m.cookie_name));
        }
        Ok(MercureCfg {
            publisher_key,
            subscriber_key,
            anonymous: m.anonymous,
            cors_origins: m.cors_origins,
            publish_origins: m.publish_origins,
            subscriptions: m.subscriptions,
            history: range("mercure.history", m.history, 1, 1_000_000)? as usize,
            heartbeat: Duration::from_secs(range("mercure.heartbeat_secs", m.heartbeat_secs, 1, 3600)?),
            cookie_name: cookie,
            placeholder_key: [&m.publisher_jwt_key, &m.subscriber_jwt_key].iter().any(|k| {
                let k = k.to_ascii_lowercase();
                k.contains("changethis") || k.contains("change-me")
            }),
        })
    }

    fn validate_cluster(c: RawCluster, browser_port: u16) -> Result<Option<Cluster>, ConfigError> {
        if c.redis.is_empty() {
            return Ok(None);
        }
        let redis = addr("cluster.redis", &c.redis)?;
        // Names and prefixes travel inside Redis keys and comet's own messages: no spaces, no
        // line breaks, nothing a key pattern would read as a wildcard.
        let plain = |s: &str| s.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'*' | b'?' | b'[' | b']' | b'\\'));
        let node = if c.node.is_empty() {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let host = host.trim();
            format!("{}:{browser_port}", if host.is_empty() { "comet" } else { host })
        } else {
            c.node
        };
        if node.len() > 64 || !plain(&node) {
            return err("cluster.node", format!("{node:?}: at most 64 printable characters, no spaces or * ? [ ] \\"));
        }
        let prefix = if c.prefix.is_empty() { "comet".to_string() } else { c.prefix };
        if prefix.len() > 64 || !plain(&prefix) {
            return err("cluster.prefix", format!("{prefix:?}: at most 64 printable characters, no spaces or * ? [ ] \\"));
        }
        Ok(Some(Cluster { redis, password: c.password, node, prefix }))
    }

    fn validate_auth(a: RawAuth) -> Result<Auth, ConfigError> {
        let mode = match a.mode.as_str() {
            "none" => AuthMode::None,
            "sqlite" => AuthMode::Sqlite,
            "http" => AuthMode::Http,
            "key" => AuthMode::Key,
            other => return err("auth.mode", format!("{other:?} is not one of \"none\", \"sqlite\", \"http\", \"key\"")),
        };
        for p in &a.open_channels {
            if p.is_empty() || !p.bytes().all(|b| b == b'*' || b.is_ascii_alphanumeric() || b"_-.:~,".contains(&b)) {
                return err("auth.open_channels", format!("{p:?} is not a channel pattern (channel id characters and *)"));
            }
        }
        if mode == AuthMode::Sqlite {
            if a.database.is_empty() {
                return err("auth.database", "mode \"sqlite\" needs the database file");
            }
            if !a.session_query.contains(":sid") {
                return err("auth.session_query", "must use the parameter :sid");
            }
            if !a.channel_query.contains(":channel") {
                return err("auth.channel_query", "must use the parameter :channel");
            }
        }
        if mode == AuthMode::Http && !a.url.starts_with("http://") {
            return err("auth.url", format!("{:?}: mode \"http\" needs an http:// URL (no TLS: keep the callback on a trusted network)", a.url));
        }
        if mode == AuthMode::Key && a.key_secret.is_empty() {
            return err("auth.key_secret", "mode \"key\" needs a secret");
        }
        if !a.key_secret.is_empty() && a.key_secret.len() < 16 {
            return err("auth.key_secret", "needs at least 16 characters");
        }
        Ok(Auth {
            mode,
            database: PathBuf::from(a.database),
            session_query: a.session_query,
            channel_query: a.channel_query,
            url: a.url,
            open_channels: a.open_channels,
            cache_ttl: Duration::from_secs(range("auth.cache_ttl_secs", a.cache_ttl_secs, 0, 86_400)?),
            cache_max_entries: range("auth.cache_max_entries", a.cache_max_entries, 0, 100_000_000)? as usize,
            key_secret: a.key_secret,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.browser.listen.port(), 8100);
        assert_eq!(c.browser.session_cookie, "PHPSESSID");
        assert_eq!(c.channels.buffer_length, 100);
        assert!(c.tokens.is_empty());
    }

    #[test]
    fn shipped_file_is_valid() {
        let text = include_str!("../server.toml");
        let c = Config::parse(text).unwrap();
        assert_eq!(c.control_listen.port(), 8101);
        assert_eq!(c.admin_listen.port(), 8102);
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("[browser]\npoll_timeout_secs = \"x\"\n", "poll_timeout_secs"),
            ("[browser]\nbogus = 1\n", "bogus"),
            ("[browser]\nlisten = \"localhost:80\"\n", "browser.listen"),
            ("[browser]\npoll_timeout_secs = 0\n", "browser.poll_timeout_secs"),
            ("[browser]\nfirst_message = \"middle\"\n", "browser.first_message"),
            ("[control]\nlisten = \"0.0.0.0:8101\"\n", "control.listen"),
            ("[admin]\nlisten = \"0.0.0.0:8102\"\n", "admin.listen"),
            ("[control.tokens]\nphp = \"short\"\n", "control.tokens.php"),
            ("[log]\nlevel = \"loud\"\n", "log.level"),
            ("[channels]\nbuffer_length = 0\n", "channels.buffer_length"),
            ("[auth]\nmode = \"ldap\"\n", "auth.mode"),
            ("[auth]\nmode = \"sqlite\"\n", "auth.database"),
            ("[auth]\nmode = \"http\"\nurl = \"https://x\"\n", "auth.url"),
            ("[auth]\nmode = \"key\"\n", "auth.key_secret"),
            ("[auth]\nopen_channels = [\"a b\"]\n", "auth.open_channels"),
            ("[workers]\nthreads = 0\n", "workers.threads"),
            ("[presence]\ntable = \"x; DROP TABLE y\"\n", "presence.table"),
            ("[presence]\ngrace_secs = 0\n", "presence.grace_secs"),
            ("[store]\nfsync = \"sometimes\"\n", "store.fsync"),
            ("[cluster]\nredis = \"nonsense\"\n", "cluster.redis"),
            ("[cluster]\nredis = \"127.0.0.1:6379\"\nnode = \"a b\"\n", "cluster.node"),
            ("[cluster]\nredis = \"127.0.0.1:6379\"\nprefix = \"x*\"\n", "cluster.prefix"),
            ("[cluster]\nredis = \"127.0.0.1:6379\"\n[store]\npath = \"x.db\"\n", "store.path"),
        ];
        for (text, key) in cases {
            let e = Config::parse(text).unwrap_err();
            assert!(e.0.contains(key), "{text:?} -> {e} does not name {key}");
        }
    }

    #[test]
    fn public_listener_with_token_is_allowed() {
        let c = Config::parse("[control]\nlisten = \"0.0.0.0:8101\"\n[control.tokens]\nphp = \"12345678\"\n").unwrap();
        assert_eq!(c.tokens.len(), 1);
    }
}

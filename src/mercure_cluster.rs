//! Mercure across a cluster. Every update goes through Redis, on the cluster's own command link:
//! one script call numbers it (`INCR`: the one order of the whole cluster), appends it to the
//! bounded history list, keeps the list of active subscriptions when it is a subscription event,
//! and publishes it on one pub/sub channel every node with `[mercure]` subscribes to. Each node
//! applies what arrives there, in that order, its own updates included, so a subscriber resumes
//! with the same `Last-Event-ID` on any node. On connect (and on every reconnect) a node reads
//! the history and the subscriptions back; updates it already had are not delivered twice.
//!
//! What Redis holds, under `<prefix>:mercure`: `:seq` (the last number given), `:h` (the history:
//! entries `seq \n json`), `:subs` (topic \n subscriber -> the entry that started it); the pub/sub
//! channel is `<prefix>:mercure` itself.

use crate::cluster::{Asker, Waiting};
use crate::mercure_hub::Entry;
use crate::resp::Value;
use crate::server::Server;

/// Numbers, stores and publishes one update. KEYS: seq, history, subs. ARGV: the pub/sub
/// channel, the entry, the history length, the subscription's field ("" when not one), "1"
/// when it starts.
pub const MERCURE_LUA: &str = r#"
local seq = redis.call('INCR', KEYS[1])
local e = seq .. '\n' .. ARGV[2]
redis.call('RPUSH', KEYS[2], e)
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
if ARGV[4] ~= '' then
  if ARGV[5] == '1' then redis.call('HSET', KEYS[3], ARGV[4], ARGV[2]) else redis.call('HDEL', KEYS[3], ARGV[4]) end
end
redis.call('PUBLISH', ARGV[1], e)
return seq
"#;

/// Reads an entry `seq \n json`.
pub fn parse_entry(b: &[u8]) -> Option<(u64, Entry)> {
    let i = b.iter().position(|&c| c == b'\n')?;
    let seq = std::str::from_utf8(&b[..i]).ok()?.parse().ok()?;
    let e = serde_json::from_slice(&b[i + 1..]).ok()?;
    Some((seq, e))
}

/// The Redis names, from the cluster's prefix.
fn keys(prefix: &str) -> [String; 4] {
    [format!("{prefix}:mercure"), format!("{prefix}:mercure:seq"), format!("{prefix}:mercure:h"), format!("{prefix}:mercure:subs")]
}

impl Server {
    /// Names the pub/sub channel of updates, once the hub and the cluster are both made.
    pub(crate) fn mercure_cluster_init(&mut self) {
        if let (Some(m), Some(c)) = (self.mercure.as_mut(), &self.cluster) {
            m.redis_channel = Some(keys(&c.cfg.prefix)[0].clone());
        }
    }

    /// On every connect: subscribe to the updates, read the history and the subscriptions.
    pub(crate) fn mercure_cluster_setup(&mut self) {
        let Some(chan) = self.mercure.as_ref().and_then(|m| m.redis_channel.clone()) else { return };
        let history = self.mercure.as_ref().map_or(1, |m| m.cfg.history);
        let now = self.now;
        let c = self.cluster();
        let [_, _, h, subs] = keys(&c.cfg.prefix);
        c.subscribe_raw(&[&chan]);
        let from = format!("-{history}");
        c.send(&[b"LRANGE", h.as_bytes(), from.as_bytes(), b"-1"], Waiting::MercureHistory, now);
        c.send(&[b"HGETALL", subs.as_bytes()], Waiting::MercureSubs, now);
    }

    /// Sends update `e` through Redis; `answer` is the publisher waiting for its id (and the CORS
    /// lines of its answer).
    pub(crate) fn cluster_mercure_publish(&mut self, answer: Option<(Asker, String)>, e: &Entry) {
        let json = match serde_json::to_string(e) {
            Ok(j) => j,
            Err(_) => return,
        };
        let max = self.cfg.limits.max_message_bytes + crate::cluster::ENTRY_HEADER_MAX;
        if json.len() > max {
            // Redis would hand it to every node as a reply larger than their caps.
            match answer {
                Some((a, cors)) => self.mercure_answer(a, &cors, 413, "the update is larger than limits.max_message_bytes once encoded\n".into()),
                None => crate::warn!("mercure: an update on {} not sent to the cluster: {} bytes encoded, over limits.max_message_bytes", e.topics.first().map_or("", |t| t), json.len()),
            }
            return;
        }
        if let Some((a, cors)) = &answer {
            if !self.cluster.as_ref().is_some_and(|c| c.up) {
                self.counters.rejected += 1;
                return self.mercure_answer(*a, cors, 503, "the cluster's Redis is not reachable; the update was not published\n".into());
            }
            if let Some(c) = self.conns.get_mut(a.token) {
                c.redis_wait += 1;
            }
        }
        let history = self.mercure.as_ref().map_or(1, |m| m.cfg.history).to_string();
        let field = e.sub.as_ref().map(|s| format!("{}\n{}", s.topic, s.subscriber)).unwrap_or_default();
        let active: &[u8] = if e.sub.as_ref().is_some_and(|s| s.active) { b"1" } else { b"0" };
        let now = self.now;
        let c = self.cluster();
        let [chan, seq, h, subs] = keys(&c.cfg.prefix);
        let sha = c.shas[crate::cluster::MERCURE].clone();
        let id = e.id.clone();
        c.send(
            &[b"EVALSHA", sha.as_bytes(), b"3", seq.as_bytes(), h.as_bytes(), subs.as_bytes(), chan.as_bytes(), json.as_bytes(), history.as_bytes(), field.as_bytes(), active],
            Waiting::Mercure(answer.map(|(a, cors)| (a, cors, id))),
            now,
        );
    }

    /// Answers a publisher that waited for Redis (or is refused before it).
    pub(crate) fn mercure_answer(&mut self, a: Asker, cors: &str, status: u16, body: String) {
        let Some(c) = self.conns.get_mut(a.token) else { return };
        if c.id != a.conn || c.dead {
            return;
        }
        c.redis_wait = c.redis_wait.saturating_sub(1);
        let ka = a.http.is_some_and(|(ka, _)| ka);
        let lines = if status == 503 { format!("{cors}Retry-After: 1\r\n") } else { cors.to_string() };
        self.respond_typed(a.token, status, &lines, "text/plain; charset=utf-8", body.as_bytes(), ka);
        if self.conns.get(a.token).is_some_and(|c| c.redis_wait == 0) {
            self.pending.push(a.token);
        }
    }

    /// Redis answered a Mercure command.
    pub(crate) fn mercure_cluster_reply(&mut self, w: Waiting, v: Value) {
        match w {
            Waiting::Mercure(answer) => {
                let Some((a, cors, id)) = answer else {
                    if let Value::Error(e) = &v {
                        crate::warn!("mercure: Redis refused an update: {}", String::from_utf8_lossy(e));
                    }
                    return;
                };
                match v {
                    Value::Int(_) => self.mercure_answer(a, &cors, 200, id),
                    Value::Error(e) => {
                        let why = format!("Redis refused the update: {}\n", String::from_utf8_lossy(&e));
                        self.mercure_answer(a, &cors, 503, why)
                    }
                    _ => self.mercure_answer(a, &cors, 503, "Redis answered the update script with something else\n".into()),
                }
            }
            Waiting::MercureHistory => {
                let Value::Array(items) = v else {
                    let now = self.now;
                    return self.cluster().malformed("an answer to the Mercure history of another shape", now);
                };
                // Oldest first: updates this node lacks are delivered in order, the rest merged.
                for item in items {
                    match item.bytes().and_then(parse_entry) {
                        Some((seq, e)) => self.mercure_apply(seq, &e),
                        None => {
                            let now = self.now;
                            self.cluster().malformed("a Mercure history entry comet cannot read", now);
                        }
                    }
                }
            }
            Waiting::MercureSubs => {
                let Value::Array(items) = v else { return };
                let list = items
                    .chunks(2)
                    .filter_map(|kv| kv.get(1).and_then(|v| v.bytes()))
                    .filter_map(|b| serde_json::from_slice::<Entry>(b).ok())
                    .filter_map(|e| e.sub)
                    .collect();
                if let Some(m) = self.mercure.as_mut() {
                    m.hub.set_active(list);
                }
            }
            _ => {}
        }
    }

    /// An update arrived on the pub/sub channel.
    pub(crate) fn mercure_cluster_message(&mut self, payload: &[u8]) {
        match parse_entry(payload) {
            Some((seq, e)) => self.mercure_apply(seq, &e),
            None => {
                let now = self.now;
                self.cluster().malformed("a Mercure update comet cannot read", now);
            }
        }
    }

    /// Node `node` was found dead (this node reaped it): its subscriptions end, once for the
    /// cluster, as if its subscribers had left.
    pub(crate) fn mercure_node_gone(&mut self, node: &str) {
        let Some(m) = self.mercure.as_mut() else { return };
        if !m.cfg.subscriptions {
            return;
        }
        let gone: Vec<(String, String, Option<serde_json::Value>)> =
            m.hub.active(None, None).into_iter().filter(|(_, _, a)| &*a.node == node).map(|(t, s, a)| (t.to_string(), s.to_string(), a.payload.clone())).collect();
        for (topic, subscriber, payload) in gone {
            self.mercure_subscription_event(&topic, &subscriber, false, payload, Some(node));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back() {
        let e = Entry { id: "a".into(), topics: vec!["t".into()], data: "x\ny".into(), private: false, event_type: None, retry: None, sub: None };
        let b = format!("42\n{}", serde_json::to_string(&e).unwrap());
        assert_eq!(parse_entry(b.as_bytes()), Some((42, e)));
        for bad in [&b""[..], b"42", b"x\n{}", b"1\n{", b"1\n{\"id\":1}"] {
            assert_eq!(parse_entry(bad), None, "{bad:?}");
        }
    }
}

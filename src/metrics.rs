//! What the admin listener reports about the daemon: Prometheus metrics (`/metrics`), the status
//! as JSON (`/status`), and the live snapshot the admin page receives. All read the loop's
//! counters; none walks every connection or channel (the admin snapshot's lists are capped).

use crate::server::{Server, AUTH_BUCKETS};
use std::fmt::Write;
use std::sync::atomic::Ordering;

/// Most sessions and channels listed on the admin page.
pub const ADMIN_LIST_CAP: usize = 100;

/// Escapes a string for a JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

impl Server {
    /// `/status`: the `INFO` fields as one JSON object (numbers stay numbers).
    pub fn status_json(&self) -> String {
        let mut o = String::from("{");
        for line in self.info_text().lines() {
            let Some((k, v)) = line.split_once(':') else { continue };
            if o.len() > 1 {
                o.push(',');
            }
            let _ = write!(o, "{}:", json_str(k));
            if !v.is_empty() && v.parse::<f64>().is_ok() {
                o.push_str(v);
            } else {
                o.push_str(&json_str(v));
            }
        }
        o.push_str("}\n");
        o
    }

    /// The admin page's live snapshot (JSON): counts, a publish rate, and at most
    /// `ADMIN_LIST_CAP` online sessions and channels.
    pub fn admin_snapshot(&self, rate: f64) -> String {
        let mut o = String::with_capacity(4096);
        let _ = write!(
            o,
            "{{\"time\":{},\"uptime\":{},\"connections\":{},\"held_polls\":{},\"eventsource_streams\":{},\"websocket_streams\":{},\"online_count\":{},\"channel_count\":{},\"published\":{},\"delivered\":{},\"publish_rate\":{rate:.1},\"online\":[",
            self.now_secs,
            self.started.elapsed().as_secs(),
            self.conns.len(),
            self.held_polls(),
            self.open_streams[0],
            self.open_streams[1],
            self.cluster.as_ref().map_or(self.presence.online_count() as i64, |c| c.presence.online),
            self.hub.channel_count(),
            self.hub.stats.published,
            self.hub.stats.delivered,
        );
        // In a cluster the list is the cluster's (a sample the heartbeat brings each second).
        let online = match &self.cluster {
            Some(c) => c.presence.sample.iter().take(ADMIN_LIST_CAP).cloned().collect(),
            None => self.presence.online_sample(ADMIN_LIST_CAP),
        };
        for (i, (sid, user)) in online.iter().enumerate() {
            let _ = write!(o, "{}{{\"sid\":{},\"user\":{}}}", if i > 0 { "," } else { "" }, json_str(sid), json_str(user.as_deref().unwrap_or("")));
        }
        o.push_str("],\"channels\":[");
        for (i, (name, n)) in self.presence.channels_sample(ADMIN_LIST_CAP).iter().enumerate() {
            let _ = write!(o, "{}{{\"name\":{},\"subscribers\":{n}}}", if i > 0 { "," } else { "" }, json_str(name));
        }
        o.push(']');
        if let Some(c) = &self.cluster {
            let _ = write!(o, ",\"cluster\":{{\"node\":{},\"link\":{},\"nodes\":[", json_str(&c.cfg.node), json_str(c.link_state()));
            for (i, n) in c.presence.alive.iter().enumerate() {
                let _ = write!(o, "{}{}", if i > 0 { "," } else { "" }, json_str(n));
            }
            o.push_str("]}");
        }
        o.push_str("}\n");
        o
    }

    /// `/metrics`: Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let [browsers, backends, admins] = self.open_by_kind;
        let k = &self.counters;
        let mut o = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
            let _ = writeln!(o, "# HELP comet_{name} {help}\n# TYPE comet_{name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(o, "comet_{name}{labels} {v}");
            }
        };
        metric("connections", "gauge", "Open connections by listener.", &[
            ("{listener=\"browser\"}", browsers as f64),
            ("{listener=\"control\"}", backends as f64),
            ("{listener=\"admin\"}", admins as f64),
        ]);
        metric("held_polls", "gauge", "Long-polls held open.", &[("", self.held_polls() as f64)]);
        metric("streams", "gauge", "EventSource and WebSocket streams open.", &[
            ("{transport=\"eventsource\"}", self.open_streams[0] as f64),
            ("{transport=\"websocket\"}", self.open_streams[1] as f64),
        ]);
        let [es, ws] = k.stream_deliveries;
        metric("deliveries_total", "counter", "Messages handed to subscribers, by transport.", &[
            ("{transport=\"longpoll\"}", self.hub.stats.delivered.saturating_sub(es + ws) as f64),
            ("{transport=\"eventsource\"}", es as f64),
            ("{transport=\"websocket\"}", ws as f64),
        ]);
        metric("sessions_online", "gauge", "Sessions online (polling, or within the grace period).", &[("", self.presence.online_count() as f64)]);
        metric("channels", "gauge", "Channels alive (messages buffered or polls held).", &[("", self.hub.channel_count() as f64)]);
        metric("buffered_messages", "gauge", "Messages in channel buffers.", &[("", self.hub.buffered_count() as f64)]);
        metric("messages_published_total", "counter", "Messages published.", &[("", self.hub.stats.published as f64)]);
        metric("messages_delivered_total", "counter", "Messages handed to polls.", &[("", self.hub.stats.delivered as f64)]);
        metric("connections_accepted_total", "counter", "Connections accepted.", &[("", k.accepted as f64)]);
        metric("connections_refused_total", "counter", "Connections refused over limits.max_connections.", &[("", k.refused as f64)]);
        metric("requests_rejected_total", "counter", "Requests answered with an error.", &[("", k.rejected as f64)]);
        metric("slow_readers_cut_total", "counter", "Connections cut for not reading (limits.max_output_bytes).", &[("", k.slow_readers as f64)]);
        metric("auth_checks_total", "counter", "Access checks by result.", &[
            ("{result=\"cache_hit\"}", k.auth_cache_hits as f64),
            ("{result=\"allowed\"}", k.auth_allowed as f64),
            ("{result=\"denied\"}", k.auth_denied as f64),
            ("{result=\"failed\"}", k.auth_failed as f64),
            ("{result=\"timeout\"}", k.jobs_timed_out as f64),
            ("{result=\"queue_full\"}", k.jobs_refused as f64),
        ]);
        metric("auth_db_queries_total", "counter", "SQL queries run by access checks.", &[("", crate::auth::DB_QUERIES.load(Ordering::Relaxed) as f64)]);
        metric("auth_http_requests_total", "counter", "Auth callback requests sent.", &[("", crate::auth::HTTP_REQUESTS.load(Ordering::Relaxed) as f64)]);
        metric("worker_queue_depth", "gauge", "Jobs waiting for a worker.", &[("", self.pool.queued() as f64)]);
        if let Some(c) = &self.cluster {
            metric("cluster_link_up", "gauge", "1 while the link to the cluster's Redis is up.", &[("", u8::from(c.is_up()) as f64)]);
            metric("cluster_reconnects_total", "counter", "Times the link to Redis came back after it was lost.", &[("", c.reconnects as f64)]);
            metric("cluster_rtt_seconds", "gauge", "Round trip of the last heartbeat to Redis.", &[("", c.presence.rtt.map_or(0.0, |d| d.as_secs_f64()))]);
            metric("cluster_nodes", "gauge", "Nodes alive in the cluster, as Redis last said.", &[("", c.presence.alive.len() as f64)]);
            metric("cluster_sessions_online", "gauge", "Sessions online in the whole cluster.", &[("", c.presence.online as f64)]);
            metric("cluster_channels_followed", "gauge", "Channels this node is subscribed to in Redis.", &[("", c.followed() as f64)]);
            metric("cluster_commands_total", "counter", "Commands sent to Redis.", &[("", c.commands as f64)]);
            metric("cluster_malformed_total", "counter", "Messages from Redis skipped as malformed.", &[("", c.malformed as f64)]);
        }
        let _ = writeln!(o, "# HELP comet_auth_check_seconds Time from a poll's arrival to its worker access check's answer.\n# TYPE comet_auth_check_seconds histogram");
        for (i, b) in AUTH_BUCKETS.iter().enumerate() {
            let _ = writeln!(o, "comet_auth_check_seconds_bucket{{le=\"{b}\"}} {}", k.auth_latency[i]);
        }
        let count = k.auth_allowed + k.auth_denied + k.auth_failed;
        let _ = writeln!(o, "comet_auth_check_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(o, "comet_auth_check_seconds_sum {}", k.auth_latency_sum);
        let _ = writeln!(o, "comet_auth_check_seconds_count {count}");
        let _ = writeln!(o, "# HELP comet_uptime_seconds Seconds since start.\n# TYPE comet_uptime_seconds gauge\ncomet_uptime_seconds {}", self.started.elapsed().as_secs());
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_str("a\"b\\c\n\u{1}é"), "\"a\\\"b\\\\c\\u000a\\u0001é\"");
    }
}

//! The flow log: one structured record per flow event, under the tracing
//! target `gateway::flow`:
//! - `open` when a client is accepted;
//! - `handoff` when its path is chosen (kernel, or userspace with the reason);
//! - `update` every `log.flow_interval` while it lives longer than that;
//! - `close` with bytes, duration, path and cause.
//!
//! Plain or JSON lines, as the rest of the log (`log.format`, or
//! `GATEWAY_LOG_FORMAT`).
use std::time::Duration;

use tracing::info;

use crate::flow::table::FlowSnapshot;

pub const TARGET: &str = "gateway::flow";

/// Logs one record, building the snapshot only when flow records are on
/// (a busy gateway with `GATEWAY_LOG=warn` skips the formatting).
pub fn record_with(event: &'static str, snapshot: impl FnOnce() -> FlowSnapshot) {
    if tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        record(event, &snapshot(), None);
    }
}

/// Logs one record for `s`. `cause` is set on `close` only.
pub fn record(event: &'static str, s: &FlowSnapshot, cause: Option<&str>) {
    info!(
        target: TARGET,
        event,
        flow = s.id,
        listener = %s.listener,
        client = %s.client,
        backend = s.backend.as_deref().unwrap_or("-"),
        path = %s.path,
        fallback = s.fallback_code.as_deref().unwrap_or("-"),
        bytes_c2b = s.bytes_client_to_backend,
        bytes_b2c = s.bytes_backend_to_client,
        kernel_bytes = s.kernel_bytes_client_to_backend + s.kernel_bytes_backend_to_client,
        user_bytes = s.user_bytes_client_to_backend + s.user_bytes_backend_to_client,
        trimmed_bytes = s.trimmed_bytes,
        pauses = s.pauses_client_to_backend + s.pauses_backend_to_client,
        msgs_c2b = s.messages_client_to_backend,
        msgs_b2c = s.messages_backend_to_client,
        duration_ms = s.age_ms,
        cause = cause.unwrap_or("-"),
        "flow {event}"
    );
}

/// Every `interval`, an `update` record for each flow older than `interval`.
pub async fn periodic(snapshot: impl Fn() -> Vec<FlowSnapshot>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        for s in snapshot() {
            if s.age_ms >= interval.as_millis() as u64 && s.path != "connecting" {
                record("update", &s, None);
            }
        }
    }
}

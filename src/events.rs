//! Container lifecycle events for kubelet's evented PLEG
//! (GetContainerEvents). A bounded broadcast: a subscriber that falls
//! behind loses the oldest events (counted and logged) and never slows the
//! daemon down.
//!
//! The channel's ring of [`BUFFER`] slots (90 KiB) is made with the first
//! subscriber: kubelet subscribes only with evented PLEG, and an event
//! nobody subscribed to is dropped either way.

use std::sync::OnceLock;

use tokio::sync::broadcast;

/// Events kept for a slow subscriber before it starts losing them.
const BUFFER: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Started,
    Stopped,
    Deleted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub container_id: String,
    pub pod_id: String,
    pub kind: EventKind,
    /// Nanoseconds since the epoch.
    pub at: i64,
}

#[derive(Debug, Default)]
pub struct Events {
    tx: OnceLock<broadcast::Sender<Event>>,
}

impl Events {
    /// Sends to every current subscriber; none is fine.
    pub fn publish(&self, container_id: &str, pod_id: &str, kind: EventKind, at: i64) {
        let Some(tx) = self.tx.get() else {
            return;
        };
        let _ = tx.send(Event {
            container_id: container_id.to_string(),
            pod_id: pod_id.to_string(),
            kind,
            at,
        });
    }

    pub fn subscribe(&self) -> Subscription {
        let tx = self.tx.get_or_init(|| broadcast::channel(BUFFER).0);
        Subscription { rx: tx.subscribe() }
    }
}

pub struct Subscription {
    rx: broadcast::Receiver<Event>,
}

impl Subscription {
    /// The next event; `None` once the daemon is shutting down.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            match self.rx.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(lost)) => {
                    tracing::warn!(lost, "container event subscriber too slow: events dropped");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_get_events_in_order_and_slow_ones_skip_ahead() {
        let events = Events::default();
        // Nobody listens yet: dropped, and not kept for a later subscriber.
        events.publish("c", "p", EventKind::Deleted, 0);
        let mut sub = events.subscribe();
        events.publish("c", "p", EventKind::Created, 1);
        events.publish("c", "p", EventKind::Started, 2);
        assert_eq!(sub.next().await.map(|e| e.kind), Some(EventKind::Created));
        assert_eq!(sub.next().await.map(|e| e.kind), Some(EventKind::Started));

        let mut slow = events.subscribe();
        for n in 0..(BUFFER as i64 + 10) {
            events.publish("c", "p", EventKind::Stopped, n);
        }
        let first = slow.next().await.expect("an event after the loss");
        assert_eq!(first.at, 10, "the oldest were dropped, the newest kept");
    }
}

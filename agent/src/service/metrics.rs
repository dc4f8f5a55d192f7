//! The node's status as metrics ([`crate::metrics`]): its arrays from [`Node::list`]
//! (what `mdctl detail` shows), its session state and fence margin, read at scrape.

use super::Node;
use crate::metrics::{ArraySource, ArrayView, SessionSource, SessionView};
use mdcluster_proto::lock_client::SessionState;

impl ArraySource for Node {
    fn arrays(&self) -> Vec<ArrayView> {
        self.list().iter().map(ArrayView::from_status).collect()
    }
}

impl SessionSource for Node {
    fn session(&self) -> SessionView {
        // No session: the old one was lost and a new one is being opened.
        let Some(s) = Node::session(self) else {
            return SessionView {
                state: "lost",
                fence_margin_seconds: 0.0,
                fence_refusals: self.fence_gate().refused(),
            };
        };
        let now = tokio::time::Instant::now();
        let deadline = s.fence_deadline();
        let margin = if deadline >= now {
            (deadline - now).as_secs_f64()
        } else {
            -(now - deadline).as_secs_f64()
        };
        SessionView {
            state: match s.state() {
                SessionState::Connected => "connected",
                SessionState::Reconnecting => "reconnecting",
                SessionState::Suspended => "suspended",
                SessionState::Lost => "lost",
                SessionState::Closed => "closed",
            },
            fence_margin_seconds: margin,
            fence_refusals: self.fence_gate().refused(),
        }
    }
}

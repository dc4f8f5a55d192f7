//! The mdcluster test harness: starts real processes (etcd, `mdserver`, `mdagent`) and
//! runs real clients (`mdadm`, `qemu-io`, `nbdinfo`, ...) against them.
//!
//! # Layout
//! - [`chaos`]: a timed NBD writer, checks of its answers against the members, events
//!   and sessions as `mdctl` shows them (the t58 chaos tests).
//! - [`cluster`]: a whole cluster (etcd, mdserver, N cluster-mode agents on 127.0.0.x)
//!   and `mdctl` runs against it (the t50 tests, and by hand).
//! - [`crash`]: the crash-consistency checker's recorder, crash-state model, two-node
//!   in-process workload and recovery check (t45).
//! - [`deploy`]: the `deploy/` Kubernetes manifests as processes (a container's command,
//!   args and env from the Deployment/DaemonSet YAML, resolved as the kubelet would).
//! - [`etcd`]: a real etcd process (free ports, readiness wait, kill -9, restart).
//! - [`monitoring`]: `deploy/monitoring/` as tests read it (rules, dashboard, the metric
//!   reference of docs/METRICS.md), scrapes, and a real Prometheus process.
//! - [`inproc`]: several agent nodes in one process over [`memlock`], on real member
//!   files (the in-process tier, t46).
//! - [`memlock`]: an in-memory lock service behind the agent's lock port, for the
//!   in-process test tier only (t46).
//! - [`pki`]: a test CA and certificates (openssl CLI) for TLS to etcd.
//! - [`server`]: `mdserver` replicas and a one-etcd test [`server::Cluster`].
//! - [`standalone`]: a standalone `mdagent` (no cluster) driven through its control
//!   socket, member checks, a raw NBD open probe (the RAID tests, t40).
//! - [`tools`]: locate the workspace binaries and run external tools with a timeout.

pub mod chaos;
pub mod cluster;
pub mod crash;
pub mod deploy;
pub mod etcd;
pub mod inproc;
pub mod memlock;
pub mod monitoring;
pub mod pki;
pub mod server;
pub mod standalone;
pub mod tools;

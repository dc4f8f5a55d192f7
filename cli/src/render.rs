//! Text and JSON renderings of cluster answers: `detail` in the shape of
//! `mdadm --detail` plus a per-node table, `nodes` as a table, events as lines.

use std::fmt::Write as _;

use comfy_table::presets::NOTHING;
use comfy_table::Table;
use mdcluster_agent::format::examine::{fmt_rfc3339_ms, fmt_time, human, level_name};
use mdcluster_proto::v1 as pb;
use serde_json::{json, Value};

/// The word for an array state.
pub fn state_word(s: i32) -> &'static str {
    match pb::ArrayRunState::try_from(s) {
        Ok(pb::ArrayRunState::Assembling) => "assembling",
        Ok(pb::ArrayRunState::Active) => "active",
        Ok(pb::ArrayRunState::Stopping) => "stopping",
        _ => "unknown",
    }
}

/// An array status as JSON.
pub fn status_json(st: &pb::ArrayStatus) -> Value {
    json!({
        "name": st.name,
        "node": st.node,
        "state": state_word(st.state),
        "uuid": st.uuid,
        "md_name": st.md_name,
        "level": st.level,
        "raid_disks": st.raid_disks,
        "size_bytes": st.size_bytes,
        "degraded": st.degraded,
        "members": st.members.iter().map(|m| json!({
            "path": m.path, "dev_number": m.dev_number, "role": m.role,
            "state": m.state, "recovery_offset": m.recovery_offset,
            "fenced_by": m.fenced_by,
        })).collect::<Vec<_>>(),
        "sync": st.sync.as_ref().map(|s| json!({
            "kind": s.kind, "state": s.state, "done_bytes": s.done_bytes,
            "total_bytes": s.total_bytes, "rate_kib_s": s.rate_kib_s,
            "chunks_done": s.chunks_done, "chunks_total": s.chunks_total,
            "speed_min_kib_s": s.speed_min_kib_s, "speed_max_kib_s": s.speed_max_kib_s,
            "errors": s.errors, "last_kind": s.last_kind, "last_chunks": s.last_chunks,
            "last_interrupted": s.last_interrupted, "runs": s.runs,
        })),
        "bitmap": st.bitmap.as_ref().map(|b| json!({
            "kind": b.kind, "chunks": b.chunks, "chunk_bytes": b.chunk_bytes,
            "dirty_bits": b.dirty_bits, "needed": b.needed, "slot": b.slot, "slots": b.slots,
        })),
        "clients": st.clients,
        "nbd_socket": st.nbd_socket,
        "nbd_tcp": st.nbd_tcp,
        "ctime_secs": st.ctime_secs,
        "events": st.events,
        "cluster_name": st.cluster_name,
    })
}

/// A detail answer as JSON.
pub fn detail_json(d: &pb::DetailResponse) -> Value {
    json!({
        "record": d.record.as_ref().map(|r| json!({
            "name": r.name, "uuid": r.uuid, "members": r.members,
            "bitmap": r.bitmap, "created_on": r.created_on,
        })),
        "nodes": d.nodes.iter().map(|n| json!({
            "node": n.node, "agent_addr": n.agent_addr, "state": n.state,
            "status": n.status.as_ref().map(status_json), "error": n.error,
        })).collect::<Vec<_>>(),
        "members": d.members.iter().map(|m| json!({
            "dev_number": m.dev_number, "role": m.role,
            "paths": m.paths.iter().map(|p| json!({
                "node": p.node, "path": p.path, "state": p.state,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn sync_running(st: &pb::ArrayStatus) -> Option<&pb::SyncInfo> {
    st.sync
        .as_ref()
        .filter(|s| !s.kind.is_empty() && (s.state == "busy" || s.state == "throttled"))
}

/// `mdctl detail` text: `mdadm --detail` of the array as the first node that runs it
/// sees it, then one line per node.
pub fn detail_text(name: &str, d: &pb::DetailResponse) -> String {
    let mut s = String::new();
    let line = |s: &mut String, k: &str, v: &str| {
        let _ = writeln!(s, "{k:>18} : {v}");
    };
    let _ = writeln!(s, "/dev/{name}:");
    let primary = d
        .nodes
        .iter()
        .filter_map(|n| n.status.as_ref())
        .find(|st| !st.uuid.is_empty());
    if let Some(st) = primary {
        let kib = st.size_bytes / 1024;
        let active = st.members.iter().filter(|m| m.state == "in_sync").count();
        let failed = st.members.iter().filter(|m| m.state == "faulty").count();
        let spares = st
            .members
            .iter()
            .filter(|m| m.state == "spare" || m.state == "recovering")
            .count();
        line(&mut s, "Version", "1.2");
        line(&mut s, "Creation Time", &fmt_time(st.ctime_secs));
        line(
            &mut s,
            "Raid Level",
            &level_name(if st.level == 0 { 1 } else { st.level }),
        );
        line(
            &mut s,
            "Array Size",
            &format!("{kib}{}", human(st.size_bytes)),
        );
        line(
            &mut s,
            "Used Dev Size",
            &format!("{kib}{}", human(st.size_bytes)),
        );
        line(&mut s, "Raid Devices", &st.raid_disks.to_string());
        line(&mut s, "Total Devices", &st.members.len().to_string());
        line(&mut s, "Persistence", "Superblock is persistent");
        s.push('\n');
        let bitmap = match st.bitmap.as_ref().map(|b| b.kind.as_str()) {
            Some("clustered") => "Clustered",
            Some(_) => "Internal",
            None => "",
        };
        if !bitmap.is_empty() {
            line(&mut s, "Intent Bitmap", bitmap);
            s.push('\n');
        }
        line(&mut s, "Update Time", &fmt_time(st.utime_secs));
        let mut state = String::from("clean");
        if st.degraded {
            state.push_str(", degraded");
        }
        let sync = sync_running(st);
        match sync.map(|x| x.kind.as_str()) {
            Some("resync") => state.push_str(", resyncing"),
            Some("recovery") => state.push_str(", recovering"),
            _ => {}
        }
        line(&mut s, "State", &format!("{state} "));
        line(&mut s, "Active Devices", &active.to_string());
        line(
            &mut s,
            "Working Devices",
            &(st.members.len() - failed).to_string(),
        );
        line(&mut s, "Failed Devices", &failed.to_string());
        line(&mut s, "Spare Devices", &spares.to_string());
        s.push('\n');
        line(
            &mut s,
            "Consistency Policy",
            if bitmap.is_empty() {
                "resync"
            } else {
                "bitmap"
            },
        );
        s.push('\n');
        if let Some(x) = sync {
            let pct = (x.done_bytes * 100).checked_div(x.total_bytes).unwrap_or(0);
            let what = if x.kind == "recovery" {
                "Rebuild Status"
            } else {
                "Resync Status"
            };
            line(&mut s, what, &format!("{pct}% complete"));
            s.push('\n');
        }
        line(&mut s, "Name", &st.md_name);
        if !st.cluster_name.is_empty() {
            line(&mut s, "Cluster Name", &st.cluster_name);
        }
        line(&mut s, "UUID", &st.uuid);
        line(&mut s, "Events", &st.events.to_string());
        let mut fenced: Vec<&pb::MemberInfo> = st
            .members
            .iter()
            .filter(|m| !m.fenced_by.is_empty())
            .collect();
        if !fenced.is_empty() {
            fenced.sort_by(|a, b| a.path.cmp(&b.path));
            let list = fenced
                .iter()
                .map(|m| format!("{} ({})", m.path, m.fenced_by))
                .collect::<Vec<_>>()
                .join(", ");
            line(&mut s, "Fenced By", &list);
        }
        s.push('\n');
        let _ = writeln!(s, "    Number   Major   Minor   RaidDevice State");
        let mut members: Vec<&pb::MemberInfo> = st.members.iter().collect();
        members.sort_by_key(|m| (m.role.unwrap_or(u32::MAX), m.dev_number));
        for m in members {
            let (rd, word) = match (m.state.as_str(), m.role) {
                ("in_sync", Some(r)) => (r.to_string(), "active sync"),
                ("recovering", Some(r)) => (r.to_string(), "spare rebuilding"),
                ("faulty", _) => ("-".to_owned(), "faulty"),
                _ => ("-".to_owned(), "spare"),
            };
            let _ = writeln!(
                s,
                "{:>8}{:>8}{:>8}{:>9}      {:<13} {}",
                m.dev_number, 0, 0, rd, word, m.path
            );
        }
    } else if let Some(r) = &d.record {
        line(&mut s, "UUID", &r.uuid);
        line(&mut s, "State", "inactive (no node runs it) ");
        line(&mut s, "Members", &r.members.join(" "));
    }
    s.push('\n');
    // Each member's path on every node that runs the array (shared storage: one device
    // may have another path on each node).
    let running: Vec<&str> = d
        .nodes
        .iter()
        .filter(|n| n.status.is_some())
        .map(|n| n.node.as_str())
        .collect();
    if !d.members.is_empty() && !running.is_empty() {
        let mut t = Table::new();
        t.load_preset(NOTHING);
        let mut head = vec!["Number".to_owned(), "RaidDevice".to_owned()];
        head.extend(running.iter().map(|n| format!("Path on {n}")));
        t.set_header(head);
        for m in &d.members {
            let mut row = vec![
                m.dev_number.to_string(),
                m.role.map_or_else(|| "-".to_owned(), |r| r.to_string()),
            ];
            row.extend(running.iter().map(|n| {
                m.paths
                    .iter()
                    .find(|p| p.node == *n)
                    .map_or_else(|| "-".to_owned(), |p| p.path.clone())
            }));
            t.add_row(row);
        }
        let _ = writeln!(s, "{t}");
        s.push('\n');
    }
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(vec!["Node", "State", "Slot", "Clients", "NBD", "Agent"]);
    for n in &d.nodes {
        let st = n.status.as_ref();
        let slot = st
            .and_then(|x| x.bitmap.as_ref())
            .map(|b| b.slot.to_string())
            .unwrap_or_else(|| "-".into());
        let clients = st
            .map(|x| x.clients.len().to_string())
            .unwrap_or_else(|| "-".into());
        let mut nbd = st.map(|x| x.nbd_socket.clone()).unwrap_or_default();
        if let Some(tcp) = st.map(|x| x.nbd_tcp.as_str()).filter(|t| !t.is_empty()) {
            nbd = format!("{nbd} nbd://{tcp}/{name}");
        }
        let state = if n.error.is_empty() {
            n.state.clone()
        } else {
            format!("{} ({})", n.state, n.error)
        };
        t.add_row(vec![
            n.node.clone(),
            state,
            slot,
            clients,
            nbd,
            n.agent_addr.clone(),
        ]);
    }
    let _ = writeln!(s, "{t}");
    s
}

/// `mdctl nodes` text.
pub fn nodes_text(r: &pb::ClusterNodesResponse) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(vec!["NODE", "AGENT", "SESSION", "STATE", "ARRAYS"]);
    for n in &r.nodes {
        let state = if n.reachable {
            "up".to_owned()
        } else {
            format!("unreachable: {}", n.error)
        };
        t.add_row(vec![
            n.node.clone(),
            n.agent_addr.clone(),
            // 0: hidden (session ids are shown only without TLS).
            if n.session_id == 0 {
                "-".to_owned()
            } else {
                format!("{:x}", n.session_id)
            },
            state,
            n.arrays.join(" "),
        ]);
    }
    format!("{t}\n")
}

/// `mdctl nodes --json`.
pub fn nodes_json(r: &pb::ClusterNodesResponse) -> Value {
    Value::Array(
        r.nodes
            .iter()
            .map(|n| {
                json!({"node": n.node, "agent_addr": n.agent_addr, "session_id": n.session_id,
                "reachable": n.reachable, "arrays": n.arrays, "error": n.error})
            })
            .collect(),
    )
}

/// One event as JSON.
pub fn event_json(e: &pb::ArrayEvent) -> Value {
    json!({"event": e.event, "node": e.node, "array": e.array, "component": e.component,
        "detail": e.detail, "time_unix_ms": e.time_unix_ms})
}

/// One event as a line: `TIME NODE EVENT DEVICE [COMPONENT]: DETAIL`, TIME in RFC 3339
/// (UTC, milliseconds).
pub fn event_line(e: &pb::ArrayEvent) -> String {
    let dev = if e.array.is_empty() {
        "-".to_owned()
    } else {
        format!("/dev/{}", e.array)
    };
    let comp = if e.component.is_empty() {
        String::new()
    } else {
        format!(" {}", e.component)
    };
    format!(
        "{} {} {} {dev}{comp}: {}",
        fmt_rfc3339_ms(e.time_unix_ms),
        e.node,
        e.event,
        e.detail
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(node: &str, slot: u32) -> pb::ArrayStatus {
        pb::ArrayStatus {
            name: "md0".into(),
            node: node.into(),
            state: pb::ArrayRunState::Active as i32,
            uuid: "7bb5b86c:d0bb91e0:06a1d599:b860b543".into(),
            md_name: "h:0".into(),
            level: 1,
            raid_disks: 2,
            size_bytes: 64512 * 1024,
            members: vec![
                pb::MemberInfo {
                    path: "/dev/vdb".into(),
                    dev_number: 1,
                    role: Some(1),
                    state: "in_sync".into(),
                    recovery_offset: 0,
                    fenced_by: "reservation".into(),
                },
                pb::MemberInfo {
                    path: "/dev/vda".into(),
                    dev_number: 0,
                    role: Some(0),
                    state: "in_sync".into(),
                    recovery_offset: 0,
                    fenced_by: "gate only".into(),
                },
            ],
            sync: Some(pb::SyncInfo {
                kind: "resync".into(),
                state: "busy".into(),
                done_bytes: 9,
                total_bytes: 100,
                ..Default::default()
            }),
            bitmap: Some(pb::BitmapInfo {
                kind: "clustered".into(),
                slot,
                slots: 4,
                ..Default::default()
            }),
            nbd_socket: format!("/run/{node}/md0.nbd"),
            events: 1,
            ..Default::default()
        }
    }

    #[test]
    fn detail_has_the_shape_of_mdadm_detail_plus_nodes() {
        let d = pb::DetailResponse {
            record: None,
            members: vec![],
            nodes: vec![
                pb::NodeArray {
                    node: "n1".into(),
                    agent_addr: "a:1".into(),
                    state: "active".into(),
                    status: Some(status("n1", 0)),
                    error: String::new(),
                },
                pb::NodeArray {
                    node: "n2".into(),
                    agent_addr: "a:2".into(),
                    state: "absent".into(),
                    status: None,
                    error: String::new(),
                },
            ],
        };
        let mut d = d;
        d.members = vec![pb::MemberPaths {
            dev_number: 1,
            role: Some(1),
            paths: vec![pb::NodePath {
                node: "n1".into(),
                path: "/dev/vdb".into(),
                state: "in_sync".into(),
            }],
        }];
        let t = detail_text("md0", &d);
        assert!(
            t.lines()
                .any(|l| l.contains("Path on n1") && !l.contains("Path on n2")),
            "a path column per node that runs the array:\n{t}"
        );
        assert!(
            t.lines().any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w == ["1", "1", "/dev/vdb"]
            }),
            "{t}"
        );
        for line in [
            "/dev/md0:",
            "           Version : 1.2",
            "        Raid Level : raid1",
            "        Array Size : 64512 (63.00 MiB 66.06 MB)",
            "      Raid Devices : 2",
            "     Intent Bitmap : Clustered",
            "             State : clean, resyncing ",
            "     Resync Status : 9% complete",
            "              UUID : 7bb5b86c:d0bb91e0:06a1d599:b860b543",
            "    Number   Major   Minor   RaidDevice State",
            "       0       0       0        0      active sync   /dev/vda",
            "       1       0       0        1      active sync   /dev/vdb",
        ] {
            assert!(t.lines().any(|l| l == line), "missing {line:?} in:\n{t}");
        }
        let n1 = t
            .lines()
            .find(|l| l.trim_start().starts_with("n1"))
            .unwrap();
        assert!(
            n1.contains("active") && n1.contains("/run/n1/md0.nbd"),
            "{n1}"
        );
        assert!(
            t.lines()
                .any(|l| l.trim_start().starts_with("n2") && l.contains("absent")),
            "{t}"
        );
        let j = detail_json(&d);
        assert_eq!(j["nodes"][0]["status"]["bitmap"]["slot"], 0);
        assert_eq!(j["nodes"][1]["state"], "absent");
        assert_eq!(j["members"][0]["paths"][0]["path"], "/dev/vdb");
        assert_eq!(j["members"][0]["paths"][0]["node"], "n1");
        // How each member fences this node off, sorted by path.
        assert!(
            t.lines()
                .any(|l| l == "         Fenced By : /dev/vda (gate only), /dev/vdb (reservation)"),
            "{t}"
        );
        let m = &j["nodes"][0]["status"]["members"];
        assert_eq!(m[0]["path"], "/dev/vdb");
        assert_eq!(m[0]["fenced_by"], "reservation");
        assert_eq!(m[1]["fenced_by"], "gate only");
    }

    #[test]
    fn events_render_as_lines_and_json() {
        let e = pb::ArrayEvent {
            event: "Fail".into(),
            node: "n1".into(),
            array: "md0".into(),
            component: "/dev/vda".into(),
            detail: "x".into(),
            time_unix_ms: 1_000_123,
        };
        assert_eq!(
            event_line(&e),
            "1970-01-01T00:16:40.123Z n1 Fail /dev/md0 /dev/vda: x"
        );
        assert_eq!(event_json(&e)["component"], "/dev/vda");
    }
}

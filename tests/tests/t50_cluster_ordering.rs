//! t50: assemble-time rules on one node of a cluster. The same members cannot be
//! assembled twice under two names (EBUSY, exit 4, naming the running array; no second
//! slot lock taken).

use mdcluster_tests::cluster::ClusterBuilder;
use mdcluster_tests::standalone::member_files;

#[test]
fn a_second_name_for_running_members_is_ebusy() {
    let c = ClusterBuilder::new(2).start().expect("cluster");
    let m = member_files(c.path(), "o", 2, 32 << 20);
    let (m0, m1) = (m[0].to_str().unwrap(), m[1].to_str().unwrap());
    c.mirror_on_two_nodes("md0", m0, m1);
    let locks = c.etcd_keys("locks/");

    eprintln!("--- md1 over md0's members on node1: EBUSY naming md0");
    let (code, err) = c.code(&["--node", "node1", "assemble", "md1", m0, m1]);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("md0") && err.contains("already assembled"),
        "{err}"
    );
    let st = c.mdstat("node1");
    assert!(st.contains("md0 : active") && !st.contains("md1"), "{st}");
    assert_eq!(c.etcd_keys("locks/"), locks, "a lock was taken or lost");

    eprintln!("--- one member alone is the same array");
    let (code, err) = c.code(&["--node", "node2", "assemble", "md1", m1]);
    assert_eq!(code, 4, "{err}");
    assert_eq!(c.etcd_keys("locks/"), locks);

    eprintln!("--- once md0 is stopped on node1, the members assemble there as md1");
    c.mdctl_ok(&["--node", "node1", "stop", "md0"]);
    c.mdctl_ok(&["--node", "node1", "assemble", "md1", m0, m1]);
    let st = c.mdstat("node1");
    assert!(st.contains("md1 : active"), "{st}");
    c.mdctl_ok(&["--node", "node1", "stop", "md1"]);
    c.mdctl_ok(&["--node", "node2", "stop", "md0"]);
    assert!(
        c.etcd_keys("locks/").is_empty(),
        "{:?}",
        c.etcd_keys("locks/")
    );
}

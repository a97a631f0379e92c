//! The toolkit's own promises, so that a helper cannot quietly start to
//! lie again: a closed connection is never taken for a quiet one.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use crate::util::*;

#[test]
fn a_close_is_not_silence_for_recv_text_or_expect_nothing() {
    let _w = watchdog(30);
    let mut node = Node::start(&["--dev", "--shutdown-timeout", "5"]);
    let mut quiet = node.connect_dev("1");
    let mut reader = node.connect_dev("2");
    let mut looker = node.connect_dev("3");
    assert!(node.wait_metric("pushwire_connections", T, |v| v == 3.0));

    // Open and quiet: a timeout, and expect_nothing passes.
    assert_eq!(quiet.recv(Duration::from_millis(100)), Recv::Timeout);
    assert_eq!(reader.recv_text(Duration::from_millis(100)), None);
    looker.expect_nothing(Duration::from_millis(100));

    // SIGTERM closes every connection with 1001.
    node.signal(libc::SIGTERM);
    assert_eq!(quiet.recv(T), Recv::Closed(1001));
    // After the close, a read is a failure, never a timeout.
    assert!(
        matches!(quiet.recv(Duration::from_millis(100)), Recv::Failed(_)),
        "a read after the close"
    );
    let text = catch_unwind(AssertUnwindSafe(|| reader.recv_text(T)));
    assert!(text.is_err(), "recv_text took a close for a timeout");
    let nothing = catch_unwind(AssertUnwindSafe(|| looker.expect_nothing(T)));
    assert!(nothing.is_err(), "expect_nothing passed on a closed socket");
    drop((quiet, reader, looker));
    assert!(node.wait_exit(Duration::from_secs(10)).is_some());
}

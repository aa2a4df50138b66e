//! Work inside a pod's network namespace. `setns` changes the namespace of
//! the calling thread only, and a tokio worker that did it would carry the
//! pod's namespace into every task it runs afterwards. So each call gets a
//! fresh std thread that enters the namespace, does its work (netlink on a
//! current-thread runtime of its own, or reading `/proc/thread-self/net`)
//! and exits; the thread is never reused.

use std::path::{Path, PathBuf};

use super::{InterfaceStats, NetworkError};

/// Runs `f` on a new thread inside the network namespace pinned at `path`.
pub async fn run_in<T, F>(path: &Path, op: &str, f: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, NetworkError> + Send + 'static,
{
    let path: PathBuf = path.to_path_buf();
    let op_name = op.to_string();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread_path = path.clone();
    let spawned = std::thread::Builder::new()
        .name("berth-netns".to_string())
        .spawn(move || {
            let outcome = enter(&thread_path, &op_name).and_then(|()| f());
            // The receiver is gone only if the caller was cancelled.
            let _ = tx.send(outcome);
        });
    let netns_error = |error: std::io::Error| NetworkError::Netns {
        op: op.to_string(),
        path: path.clone(),
        error,
    };
    spawned.map_err(netns_error)?;
    rx.await
        .map_err(|_| netns_error(std::io::Error::other("the namespace thread died")))?
}

fn enter(path: &Path, op: &str) -> Result<(), NetworkError> {
    let fail = |error: std::io::Error| NetworkError::Netns {
        op: op.to_string(),
        path: path.to_path_buf(),
        error,
    };
    let file = std::fs::File::open(path).map_err(fail)?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|errno| fail(std::io::Error::from(errno)))
}

/// Runs async netlink work inside the namespace, on a current-thread
/// runtime of the namespace thread.
pub async fn netlink_in<T, F, Fut>(path: &Path, op: &str, f: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, NetworkError>>,
{
    let op_name = op.to_string();
    let path_buf = path.to_path_buf();
    run_in(path, op, move || {
        let fail = |error: std::io::Error| NetworkError::Netns {
            op: op_name.clone(),
            path: path_buf.clone(),
            error,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(fail)?;
        runtime.block_on(async {
            // The socket is created here, so it belongs to the pod's namespace.
            let (connection, handle, _) = rtnetlink::new_connection().map_err(fail)?;
            let task = tokio::spawn(connection);
            let outcome = f(handle).await;
            task.abort();
            outcome
        })
    })
    .await
}

/// rx/tx counters of the namespace's interfaces but `lo`.
pub async fn interface_stats(path: &Path) -> Result<Vec<InterfaceStats>, NetworkError> {
    let path_buf = path.to_path_buf();
    run_in(path, "read interface counters", move || {
        let text = std::fs::read_to_string("/proc/thread-self/net/dev").map_err(|error| {
            NetworkError::Netns {
                op: "read /proc/thread-self/net/dev".to_string(),
                path: path_buf.clone(),
                error,
            }
        })?;
        Ok(parse_net_dev(&text))
    })
    .await
}

/// `/proc/net/dev`: two header lines, then `name: rx_bytes rx_packets
/// rx_errs rx_drop … (8 rx fields) tx_bytes tx_packets tx_errs tx_drop …`.
pub fn parse_net_dev(text: &str) -> Vec<InterfaceStats> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            let name = name.trim();
            if name == "lo" {
                return None;
            }
            let n: Vec<u64> = counters
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            if n.len() < 12 {
                return None;
            }
            Some(InterfaceStats {
                name: name.to_string(),
                rx_bytes: n[0],
                rx_packets: n[1],
                rx_errors: n[2],
                rx_dropped: n[3],
                tx_bytes: n[8],
                tx_packets: n[9],
                tx_errors: n[10],
                tx_dropped: n[11],
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_counters_without_lo() {
        let text = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0
  eth0:    5000      40    2    1    0     0          0         0     7000      50    3    4    0     0       0          0
";
        assert_eq!(
            parse_net_dev(text),
            vec![InterfaceStats {
                name: "eth0".to_string(),
                rx_bytes: 5000,
                rx_packets: 40,
                rx_errors: 2,
                rx_dropped: 1,
                tx_bytes: 7000,
                tx_packets: 50,
                tx_errors: 3,
                tx_dropped: 4,
            }]
        );
    }
}

//! Exec, Attach and PortForward through the streaming server, as kubelet
//! and crictl use it: the CRI call returns a URL, the test client opens it
//! and speaks WebSocket (`tokio-tungstenite`) or SPDY/3.1 (frames written
//! with berth's frame codec, whose encoding is checked against frames a Go
//! client made in the unit tests) with every protocol version kubelet
//! negotiates. Checked: stdout, stderr, stdin and its close, the exit code on
//! the error stream, tty resizes, attachers, port forwarding into the pod's
//! network namespace, single-use tokens, and that a client leaving mid-way
//! ends its exec.

mod common;
#[path = "support/rig.rs"]
mod rig;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use berth::streaming::spdy::{Codec, Frame, FrameLimits, Headers};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use k8s_cri::v1::*;
use rig::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Bound on one whole streaming session in these tests.
const SESSION_LIMIT: Duration = Duration::from_secs(60);

// ------------------------------------------------------------ websocket

/// A WebSocket client of the streaming server.
#[derive(Debug)]
struct Ws {
    ws: WebSocketStream<TcpStream>,
    protocol: String,
    /// What `read_until` received so far, per channel.
    seen: BTreeMap<u8, Vec<u8>>,
}

impl Ws {
    /// Opens `url` offering `protocols` (in order); the server's choice is
    /// [`Ws::protocol`].
    async fn open(url: &str, protocols: &[&str]) -> Result<Ws, String> {
        let ws_url = url.replacen("http://", "ws://", 1);
        let mut request = ws_url.into_client_request().map_err(|e| e.to_string())?;
        if !protocols.is_empty() {
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                protocols.join(", ").parse().expect("header value"),
            );
        }
        let host = request.uri().authority().expect("authority").to_string();
        let tcp = TcpStream::connect(host).await.map_err(|e| e.to_string())?;
        let (ws, response) = tokio_tungstenite::client_async(request, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let protocol = response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        Ok(Ws {
            ws,
            protocol,
            seen: BTreeMap::new(),
        })
    }

    fn base64(&self) -> bool {
        self.protocol.contains("base64")
    }

    async fn send(&mut self, channel: u8, data: &[u8]) {
        let message = if self.base64() {
            let mut text = String::from(char::from(b'0' + channel));
            text.push_str(&base64::engine::general_purpose::STANDARD.encode(data));
            Message::text(text)
        } else {
            let mut frame = vec![channel];
            frame.extend_from_slice(data);
            Message::binary(frame)
        };
        self.ws
            .send(message)
            .await
            .expect("send to the streaming server");
    }

    /// v5's half-close of a channel the client writes.
    async fn close_channel(&mut self, channel: u8) {
        self.ws
            .send(Message::binary(vec![255, channel]))
            .await
            .expect("send close signal");
    }

    /// The next (channel, data), None when the server closed.
    async fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            match self.ws.next().await? {
                Ok(Message::Binary(data)) => {
                    let (&channel, rest) = data.split_first()?;
                    return Some((channel, rest.to_vec()));
                }
                Ok(Message::Text(text)) => {
                    let bytes = text.as_bytes();
                    let (&channel, rest) = bytes.split_first()?;
                    let data = base64::engine::general_purpose::STANDARD
                        .decode(rest)
                        .expect("base64 frame");
                    return Some((channel - b'0', data));
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Everything per channel until the server closes.
    async fn collect(mut self) -> BTreeMap<u8, Vec<u8>> {
        let mut got: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
        within("the session to end", SESSION_LIMIT, async {
            while let Some((channel, data)) = self.next().await {
                got.entry(channel).or_default().extend(data);
            }
        })
        .await;
        got
    }

    /// Reads until channel `channel` has received text containing `needle`
    /// (what other channels get meanwhile is kept for their turn).
    async fn read_until(&mut self, channel: u8, needle: &str) -> String {
        let seen_text = |seen: &BTreeMap<u8, Vec<u8>>| {
            String::from_utf8_lossy(seen.get(&channel).map(Vec::as_slice).unwrap_or_default())
                .into_owned()
        };
        within(
            &format!("{needle:?} on channel {channel}"),
            SESSION_LIMIT,
            async {
                while !seen_text(&self.seen).contains(needle) {
                    match self.next().await {
                        Some((c, data)) => self.seen.entry(c).or_default().extend(data),
                        None => panic!("closed before {needle:?}; got {:?}", seen_text(&self.seen)),
                    }
                }
            },
        )
        .await;
        seen_text(&self.seen)
    }
}

fn text(got: &BTreeMap<u8, Vec<u8>>, channel: u8) -> String {
    String::from_utf8_lossy(got.get(&channel).map(Vec::as_slice).unwrap_or_default()).into_owned()
}

/// The v4+ status on the error channel.
fn status_json(raw: &str) -> serde_json::Value {
    serde_json::from_str(raw).unwrap_or_else(|e| panic!("status {raw:?}: {e}"))
}

// ----------------------------------------------------------------- spdy

/// A SPDY/3.1 client of the streaming server: the HTTP upgrade written by
/// hand, then frames from berth's codec.
struct Spdy {
    tcp: TcpStream,
    codec: Codec,
    inbuf: BytesMut,
    next_id: u32,
    /// Stream id → its `streamtype` (or `port`) name, for reports.
    names: BTreeMap<u32, String>,
}

/// What a SPDY session delivered, per stream name.
#[derive(Debug, Default)]
struct SpdyOutput {
    data: BTreeMap<String, Vec<u8>>,
    finished: Vec<String>,
    reset: Vec<String>,
}

impl Spdy {
    /// Upgrades `url`; Err is the HTTP status line and body of a refusal.
    async fn open(url: &str, protocols: &[&str]) -> Result<(Spdy, String), String> {
        let rest = url.strip_prefix("http://").expect("http url");
        let (host, path) = rest.split_once('/').expect("path");
        let mut tcp = TcpStream::connect(host).await.map_err(|e| e.to_string())?;
        let mut request = format!(
            "POST /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nContent-Length: 0\r\n"
        );
        for p in protocols {
            request.push_str(&format!("X-Stream-Protocol-Version: {p}\r\n"));
        }
        request.push_str("\r\n");
        tcp.write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tcp.read(&mut byte).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        if !head.starts_with("HTTP/1.1 101") {
            let mut body = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut body)).await;
            return Err(format!("{head}{}", String::from_utf8_lossy(&body)));
        }
        let protocol = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("x-stream-protocol-version")
                    .then(|| value.trim().to_string())
            })
            .unwrap_or_default();
        let spdy = Spdy {
            tcp,
            codec: Codec::new(FrameLimits::default()).expect("codec"),
            inbuf: BytesMut::new(),
            next_id: 1,
            names: BTreeMap::new(),
        };
        Ok((spdy, protocol))
    }

    async fn send(&mut self, frame: Frame) {
        let mut out = BytesMut::new();
        self.codec.encode(&frame, &mut out).expect("encode");
        self.tcp.write_all(&out).await.expect("send frame");
    }

    /// Opens a stream with `headers`; its id.
    async fn create(&mut self, name: &str, headers: &[(&str, &str)]) -> u32 {
        let id = self.next_id;
        self.next_id += 2;
        self.names.insert(id, name.to_string());
        let headers: Headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.send(Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            fin: false,
            unidirectional: false,
            headers,
        })
        .await;
        id
    }

    async fn data(&mut self, id: u32, data: &[u8], fin: bool) {
        self.send(Frame::Data {
            stream_id: id,
            fin,
            data: Bytes::copy_from_slice(data),
        })
        .await;
    }

    /// The next frame; None when the server closed the connection.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.inbuf).expect("server frame") {
                return Some(frame);
            }
            let mut buf = [0u8; 16 * 1024];
            let n = self.tcp.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            self.inbuf.extend_from_slice(&buf[..n]);
        }
    }

    /// Reads until the server ends the session (GOAWAY or close) or
    /// `until` says enough.
    async fn collect_until(&mut self, mut until: impl FnMut(&SpdyOutput) -> bool) -> SpdyOutput {
        let mut out = SpdyOutput::default();
        within("the SPDY session", SESSION_LIMIT, async {
            while !until(&out) {
                let Some(frame) = self.next().await else {
                    return;
                };
                match frame {
                    Frame::Data {
                        stream_id,
                        fin,
                        data,
                    } => {
                        let name = self.names.get(&stream_id).cloned().unwrap_or_default();
                        out.data
                            .entry(name.clone())
                            .or_default()
                            .extend_from_slice(&data);
                        if fin {
                            out.finished.push(name);
                        }
                    }
                    Frame::RstStream { stream_id, .. } => {
                        out.reset
                            .push(self.names.get(&stream_id).cloned().unwrap_or_default());
                    }
                    Frame::GoAway { .. } => return,
                    _ => {}
                }
            }
        })
        .await;
        out
    }

    async fn collect(mut self) -> SpdyOutput {
        self.collect_until(|_| false).await
    }
}

impl SpdyOutput {
    fn text(&self, name: &str) -> String {
        String::from_utf8_lossy(self.data.get(name).map(Vec::as_slice).unwrap_or_default())
            .into_owned()
    }
}

// ------------------------------------------------------------- requests

async fn exec_url(
    rig: &Rig,
    id: &str,
    cmd: &[&str],
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
) -> String {
    let mut client = rig.rt();
    within(
        "Exec",
        Duration::from_secs(30),
        client.exec(ExecRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty,
            stdin,
            stdout,
            stderr,
        }),
    )
    .await
    .expect("Exec")
    .into_inner()
    .url
}

async fn attach_url(rig: &Rig, id: &str, stdin: bool, stdout: bool, stderr: bool) -> String {
    let mut client = rig.rt();
    within(
        "Attach",
        Duration::from_secs(30),
        client.attach(AttachRequest {
            container_id: id.to_string(),
            stdin,
            tty: false,
            stdout,
            stderr,
        }),
    )
    .await
    .expect("Attach")
    .into_inner()
    .url
}

async fn port_forward_url(rig: &Rig, pod: &str, ports: &[i32]) -> String {
    let mut client = rig.rt();
    within(
        "PortForward",
        Duration::from_secs(30),
        client.port_forward(PortForwardRequest {
            pod_sandbox_id: pod.to_string(),
            port: ports.to_vec(),
        }),
    )
    .await
    .expect("PortForward")
    .into_inner()
    .url
}

/// A running busybox container that sleeps, in a hostNetwork pod.
async fn sleeper(rig: &mut Rig, name: &str) -> String {
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod(name).await;
    rig.run(&pod, container(name, &busybox, SLEEPER)).await
}

/// A pod with its own network namespace running busybox httpd on `port`,
/// serving `body` as /index.html; returns (pod, container) once it listens.
async fn httpd_pod(rig: &mut Rig, name: &str, port: u16, body: &str) -> (String, String) {
    let busybox = rig.pull("busybox").await;
    let own_network = NamespaceOption {
        network: NamespaceMode::Pod as i32,
        ..namespaces()
    };
    let mut pod_config = rig.pod_config(name);
    if let Some(linux) = pod_config.linux.as_mut()
        && let Some(sc) = linux.security_context.as_mut()
    {
        sc.namespace_options = Some(own_network.clone());
    }
    let pod = rig.run_pod(pod_config).await;
    let script = format!(
        "mkdir -p /www && echo {body} > /www/index.html && exec httpd -f -p {port} -h /www"
    );
    let mut config = container("httpd", &busybox, &["sh", "-c", &script]);
    if let Some(linux) = config.linux.as_mut()
        && let Some(sc) = linux.security_context.as_mut()
    {
        sc.namespace_options = Some(own_network);
    }
    let id = rig.run(&pod, config).await;
    // httpd listens once the shell got to exec it.
    let listening = format!("netstat -ltn | grep -q :{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while rig.exec(&id, &["sh", "-c", &listening]).await.0 != 0 {
        assert!(std::time::Instant::now() < deadline, "httpd never listened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (pod, id)
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn websocket_exec_speaks_every_protocol_version() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let id = sleeper(&mut rig, "wsver").await;
    let script = ["sh", "-c", "echo out; echo err >&2; exit 3"];
    for protocol in [
        "v5.channel.k8s.io",
        "v4.channel.k8s.io",
        "v4.base64.channel.k8s.io",
        "channel.k8s.io",
        "base64.channel.k8s.io",
    ] {
        let url = exec_url(&rig, &id, &script, false, true, true, false).await;
        let ws = Ws::open(&url, &[protocol]).await.expect("upgrade");
        assert_eq!(ws.protocol, protocol);
        let got = ws.collect().await;
        assert_eq!(text(&got, 1), "out\n", "{protocol}: stdout");
        assert_eq!(text(&got, 2), "err\n", "{protocol}: stderr");
        let status = text(&got, 3);
        if protocol.starts_with("v4.") || protocol.starts_with("v5.") {
            let status = status_json(&status);
            assert_eq!(status["status"], "Failure", "{protocol}");
            assert_eq!(status["reason"], "NonZeroExitCode", "{protocol}");
            assert_eq!(status["details"]["causes"][0]["message"], "3", "{protocol}");
        } else {
            assert!(
                status.contains("non-zero exit code") && status.contains("exit code 3"),
                "{protocol}: {status:?}"
            );
        }
    }
    // Success: v4 says so; the first protocol says nothing.
    let url = exec_url(&rig, &id, &["true"], false, true, false, false).await;
    let got = Ws::open(&url, &["v4.channel.k8s.io"])
        .await
        .expect("upgrade")
        .collect()
        .await;
    assert_eq!(status_json(&text(&got, 3))["status"], "Success");
    let url = exec_url(&rig, &id, &["true"], false, true, false, false).await;
    let got = Ws::open(&url, &["channel.k8s.io"])
        .await
        .expect("upgrade")
        .collect()
        .await;
    assert_eq!(text(&got, 3), "");
    // A command that cannot run is an internal error naming it.
    let url = exec_url(&rig, &id, &["/no/such/binary"], false, true, true, false).await;
    let got = Ws::open(&url, &["v5.channel.k8s.io"])
        .await
        .expect("upgrade")
        .collect()
        .await;
    let status = status_json(&text(&got, 3));
    assert_eq!(status["reason"], "InternalError");
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("/no/such/binary")),
        "{status}"
    );
    rig.finish().await;
}

#[tokio::test]
async fn websocket_v5_exec_feeds_stdin_and_closes_it() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let id = sleeper(&mut rig, "wsstdin").await;
    let url = exec_url(
        &rig,
        &id,
        &["sh", "-c", "cat; echo done"],
        true,
        true,
        false,
        false,
    )
    .await;
    let mut ws = Ws::open(&url, &["v5.channel.k8s.io"])
        .await
        .expect("upgrade");
    ws.send(0, b"hello ").await;
    ws.send(0, b"world\n").await;
    // Without the close signal `cat` would wait for ever.
    ws.close_channel(0).await;
    let got = ws.collect().await;
    assert_eq!(text(&got, 1), "hello world\ndone\n");
    assert_eq!(status_json(&text(&got, 3))["status"], "Success");
    rig.finish().await;
}

#[tokio::test]
async fn websocket_exec_with_a_tty_applies_resizes() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let id = sleeper(&mut rig, "wstty").await;
    let url = exec_url(
        &rig,
        &id,
        &["sh", "-c", "read line; tty; stty size; exit 7"],
        true,
        true,
        false,
        true,
    )
    .await;
    let mut ws = Ws::open(&url, &["v5.channel.k8s.io"])
        .await
        .expect("upgrade");
    ws.send(4, br#"{"Width":91,"Height":33}"#).await;
    // The resize is applied before the process reads its line.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send(0, b"go\n").await;
    let got = ws.collect().await;
    let out = text(&got, 1);
    assert!(out.contains("/dev/pts/"), "a terminal: {out:?}");
    assert!(out.contains("33 91"), "resized: {out:?}");
    assert!(!got.contains_key(&2), "a tty has no stderr");
    let status = status_json(&text(&got, 3));
    assert_eq!(status["details"]["causes"][0]["message"], "7");
    rig.finish().await;
}

#[tokio::test]
async fn websocket_attachers_each_get_the_output_and_feed_stdin() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("wsattach").await;
    let mut config = container(
        "echoer",
        &busybox,
        &[
            "sh",
            "-c",
            "while read line; do echo got $line; echo warn $line >&2; done",
        ],
    );
    config.stdin = true;
    let id = rig.run(&pod, config).await;
    let first_url = attach_url(&rig, &id, true, true, true).await;
    let second_url = attach_url(&rig, &id, false, true, false).await;
    let mut first = Ws::open(&first_url, &["v5.channel.k8s.io"])
        .await
        .expect("upgrade");
    let mut second = Ws::open(&second_url, &["v4.channel.k8s.io"])
        .await
        .expect("upgrade");
    // Both are attached before the input goes in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.send(0, b"one\n").await;
    first.read_until(1, "got one").await;
    second.read_until(1, "got one").await;
    first.read_until(2, "warn one").await;
    // The container outlives its attachers.
    drop(first);
    drop(second);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rig.status(&id).await.state,
        ContainerState::ContainerRunning as i32
    );
    let url = attach_url(&rig, &id, true, true, false).await;
    let mut again = Ws::open(&url, &["v5.channel.k8s.io"])
        .await
        .expect("upgrade");
    tokio::time::sleep(Duration::from_millis(300)).await;
    again.send(0, b"two\n").await;
    again.read_until(1, "got two").await;
    rig.finish().await;
}

#[tokio::test]
async fn websocket_port_forward_reaches_a_server_in_the_pods_network_namespace() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let (pod, _) = httpd_pod(&mut rig, "wspf", 8080, "hello-from-the-pod").await;
    let url = port_forward_url(&rig, &pod, &[8080]).await;
    let mut ws = Ws::open(&url, &["v4.channel.k8s.io"])
        .await
        .expect("upgrade");
    // Each channel starts with the port, little-endian.
    let mut first = BTreeMap::new();
    while first.len() < 2 {
        let (channel, data) = within("port frames", SESSION_LIMIT, ws.next())
            .await
            .expect("port frame");
        first.insert(channel, data);
    }
    assert_eq!(first[&0], 8080u16.to_le_bytes());
    assert_eq!(first[&1], 8080u16.to_le_bytes());
    ws.send(0, b"GET /index.html HTTP/1.0\r\n\r\n").await;
    let response = ws.read_until(0, "hello-from-the-pod").await;
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response:?}");
    drop(ws);
    rig.finish().await;
}

#[tokio::test]
async fn tokens_are_single_use_and_unknown_ones_are_not_found() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let id = sleeper(&mut rig, "tokens").await;
    let marker = "/tmp/berth-token-test-ran";
    let url = exec_url(
        &rig,
        &id,
        &["sh", "-c", &format!("echo x >> {marker}")],
        false,
        true,
        false,
        false,
    )
    .await;
    let unknown = format!(
        "{}/exec/AAAAAAAA",
        url.rsplit_once("/exec/").expect("exec url").0
    );
    let refused = Ws::open(&unknown, &["v5.channel.k8s.io"])
        .await
        .expect_err("unknown");
    assert!(refused.contains("404"), "{refused}");
    Ws::open(&url, &["v5.channel.k8s.io"])
        .await
        .expect("first use")
        .collect()
        .await;
    let refused = Ws::open(&url, &["v5.channel.k8s.io"])
        .await
        .expect_err("second use");
    assert!(refused.contains("404"), "{refused}");
    // The command ran exactly once.
    assert_eq!(rig.exec_ok(&id, &["cat", marker]).await, "x\n");
    // A token of one kind does not open another endpoint.
    let attach = attach_url(&rig, &id, false, true, false).await;
    let wrong = attach.replacen("/attach/", "/exec/", 1);
    assert!(
        Ws::open(&wrong, &[])
            .await
            .expect_err("wrong endpoint")
            .contains("404")
    );
    rig.finish().await;
}

#[tokio::test]
async fn streaming_requests_are_validated_like_kubelet() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let id = sleeper(&mut rig, "validate").await;
    let mut client = rig.rt();
    let exec = |tty, stdin, stdout, stderr| ExecRequest {
        container_id: id.clone(),
        cmd: vec!["true".into()],
        tty,
        stdin,
        stdout,
        stderr,
    };
    for (request, why) in [
        (exec(true, false, true, true), "tty and stderr"),
        (exec(false, false, false, false), "no stream"),
        (
            ExecRequest {
                cmd: Vec::new(),
                ..exec(false, false, true, false)
            },
            "no command",
        ),
    ] {
        let status = client.exec(request).await.expect_err(why);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{why}: {status}"
        );
    }
    let status = client
        .exec(ExecRequest {
            container_id: "0123456789abcdef".into(),
            ..exec(false, false, true, false)
        })
        .await
        .expect_err("unknown container");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status}");
    let status = client
        .port_forward(PortForwardRequest {
            pod_sandbox_id: String::new(),
            port: vec![80],
        })
        .await
        .expect_err("no pod");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    rig.stop(&id, 0).await;
    let status = client
        .attach(AttachRequest {
            container_id: id.clone(),
            stdout: true,
            ..AttachRequest::default()
        })
        .await
        .expect_err("exited container");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status}");
    rig.finish().await;
}

#[tokio::test]
async fn a_client_that_leaves_mid_exec_ends_the_process() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let id = sleeper(&mut rig, "leave").await;
    let url = exec_url(&rig, &id, &["sleep", "4242"], true, true, false, false).await;
    let ws = Ws::open(&url, &["v5.channel.k8s.io"])
        .await
        .expect("upgrade");
    let running = || async {
        rig.exec(&id, &["sh", "-c", "ps -o args | grep -c '^sleep 4242'"])
            .await
            .1
            .trim()
            .to_string()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while running().await != "1" {
        assert!(
            std::time::Instant::now() < deadline,
            "the exec never started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(ws);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while running().await != "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "the exec outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rig.finish().await;
}

/// The daemon's resident set, from /proc.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn a_thousand_exec_syncs_across_ten_containers_leave_no_zombie_and_no_growth() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("execmany").await;
    let mut targets = Vec::new();
    for n in 0..10 {
        let id = rig
            .run(&pod, container(&format!("target{n}"), &busybox, SLEEPER))
            .await;
        let init = rig.pid(&id).await;
        let cgroup = rig.cgroup(&id).await;
        assert!(
            !cgroup_members(&cgroup).is_empty(),
            "the container has a cgroup at {cgroup}"
        );
        targets.push((id, init, cgroup));
    }
    let daemon = rig.daemon_pid.expect("daemon running");
    let ids: Vec<String> = targets.iter().map(|(id, _, _)| id.clone()).collect();
    let run = |count: usize| {
        let ids = ids.clone();
        let client = rig.rt();
        async move {
            let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut workers = Vec::new();
            for _ in 0..16 {
                let mut client = client.clone();
                let ids = ids.clone();
                let next = next.clone();
                workers.push(tokio::spawn(async move {
                    loop {
                        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if n >= count {
                            return;
                        }
                        let out = within(
                            "ExecSync",
                            RPC_LIMIT,
                            client.exec_sync(ExecSyncRequest {
                                container_id: ids[n % ids.len()].clone(),
                                cmd: strs(&["true"]),
                                timeout: 30,
                            }),
                        )
                        .await
                        .expect("ExecSync true")
                        .into_inner();
                        assert_eq!(out.exit_code, 0, "{out:?}");
                    }
                }));
            }
            for w in workers {
                w.await.expect("exec worker");
            }
        }
    };
    // Warm up (thread pools, allocator arenas) before the baseline.
    run(100).await;
    let before = rss_kib(daemon);
    run(1000).await;
    let after = rss_kib(daemon);
    assert!(
        after < before + 16 * 1024,
        "daemon RSS grew from {before} KiB to {after} KiB over 1000 execs"
    );

    // A process that just exited may be a zombie for a moment; one that
    // stays one was never reaped.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut roots: Vec<i32> = berth_processes(&rig.base(), rig.daemon_pid)
            .iter()
            .map(|p| p.pid)
            .collect();
        roots.extend(targets.iter().map(|(_, init, _)| *init));
        let zombies = zombies_under(&roots);
        let strays: Vec<_> = targets
            .iter()
            .flat_map(|(_, init, cgroup)| {
                cgroup_members(cgroup)
                    .into_iter()
                    .filter(|(_, pids)| pids != &[*init])
                    .collect::<Vec<_>>()
            })
            .collect();
        if zombies.is_empty() && strays.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after 1100 execs: zombies {zombies:?}, cgroup members besides init {strays:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (id, _, _) in &targets {
        assert_eq!(
            rig.status(id).await.state,
            ContainerState::ContainerRunning as i32
        );
    }
    rig.finish().await;
}

#[tokio::test]
async fn spdy_exec_speaks_every_protocol_version() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let id = sleeper(&mut rig, "spdyver").await;
    let script = ["sh", "-c", "echo out; echo err >&2; exit 3"];
    for protocol in [
        "v4.channel.k8s.io",
        "v3.channel.k8s.io",
        "v2.channel.k8s.io",
        "channel.k8s.io",
    ] {
        let url = exec_url(&rig, &id, &script, false, true, true, false).await;
        // kubectl offers every version, newest first.
        let offered = ["v5.channel.k8s.io", protocol];
        let (mut spdy, chosen) = Spdy::open(&url, &offered).await.expect("upgrade");
        assert_eq!(chosen, protocol);
        spdy.create("error", &[("streamtype", "error")]).await;
        spdy.create("stdout", &[("streamtype", "stdout")]).await;
        spdy.create("stderr", &[("streamtype", "stderr")]).await;
        let got = spdy.collect().await;
        assert_eq!(got.text("stdout"), "out\n", "{protocol}: stdout");
        assert_eq!(got.text("stderr"), "err\n", "{protocol}: stderr");
        let status = got.text("error");
        if protocol == "v4.channel.k8s.io" {
            let status = status_json(&status);
            assert_eq!(status["reason"], "NonZeroExitCode", "{protocol}");
            assert_eq!(status["details"]["causes"][0]["message"], "3", "{protocol}");
        } else {
            assert!(status.contains("exit code 3"), "{protocol}: {status:?}");
        }
        assert!(
            got.finished.contains(&"stdout".to_string()),
            "{protocol}: stdout ends with FIN: {got:?}"
        );
    }
    // No common protocol: 403 naming the server's.
    let url = exec_url(&rig, &id, &["true"], false, true, false, false).await;
    let refused = Spdy::open(&url, &["v9.channel.k8s.io"])
        .await
        .err()
        .expect("refused");
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(
        refused
            .to_ascii_lowercase()
            .contains("x-accepted-stream-protocol-versions: v4.channel.k8s.io"),
        "{refused}"
    );
    rig.finish().await;
}

#[tokio::test]
async fn spdy_exec_with_stdin_and_a_tty_resizes_and_reports_the_exit_code() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let id = sleeper(&mut rig, "spdytty").await;
    let url = exec_url(
        &rig,
        &id,
        &["sh", "-c", "read line; echo line=$line; stty size; exit 9"],
        true,
        true,
        false,
        true,
    )
    .await;
    let (mut spdy, _) = Spdy::open(&url, &["v4.channel.k8s.io"])
        .await
        .expect("upgrade");
    spdy.create("error", &[("streamtype", "error")]).await;
    let stdin = spdy.create("stdin", &[("streamtype", "stdin")]).await;
    spdy.create("stdout", &[("streamtype", "stdout")]).await;
    let resize = spdy.create("resize", &[("streamtype", "resize")]).await;
    spdy.data(resize, br#"{"Width":100,"Height":40}"#, false)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    spdy.data(stdin, b"typed\n", false).await;
    let got = spdy.collect().await;
    let out = got.text("stdout");
    assert!(out.contains("line=typed"), "{out:?}");
    assert!(out.contains("40 100"), "resized: {out:?}");
    assert_eq!(
        status_json(&got.text("error"))["details"]["causes"][0]["message"],
        "9"
    );
    rig.finish().await;
}

#[tokio::test]
async fn spdy_attach_streams_output_and_stdin() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let busybox = rig.pull("busybox").await;
    let pod = rig.pod("spdyattach").await;
    let mut config = container(
        "echoer",
        &busybox,
        &["sh", "-c", "while read line; do echo got $line; done"],
    );
    config.stdin = true;
    config.stdin_once = true;
    let id = rig.run(&pod, config).await;
    let url = attach_url(&rig, &id, true, true, false).await;
    let (mut spdy, _) = Spdy::open(&url, &["v4.channel.k8s.io"])
        .await
        .expect("upgrade");
    spdy.create("error", &[("streamtype", "error")]).await;
    let stdin = spdy.create("stdin", &[("streamtype", "stdin")]).await;
    spdy.create("stdout", &[("streamtype", "stdout")]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    spdy.data(stdin, b"hello\n", false).await;
    let got = spdy
        .collect_until(|o| o.text("stdout").contains("got hello"))
        .await;
    assert!(got.text("stdout").contains("got hello"), "{got:?}");
    // stdin_once: the end of this attacher's input is the end of the
    // container's, so the loop ends and the container exits 0.
    spdy.data(stdin, b"", true).await;
    let got = spdy.collect().await;
    assert_eq!(status_json(&got.text("error"))["status"], "Success");
    let status = rig.wait_exited(&id).await;
    assert_eq!(status.exit_code, 0);
    rig.finish().await;
}

#[tokio::test]
async fn spdy_port_forward_pairs_streams_by_request_id() {
    let Some(mut rig) = Rig::start().await else {
        return;
    };
    let (pod, _) = httpd_pod(&mut rig, "spdypf", 8081, "spdy-forwarded").await;
    let url = port_forward_url(&rig, &pod, &[]).await;
    let (mut spdy, protocol) = Spdy::open(&url, &["portforward.k8s.io"])
        .await
        .expect("upgrade");
    assert_eq!(protocol, "portforward.k8s.io");
    // Two connections on one session, as kubectl makes them.
    for request in ["0", "1"] {
        spdy.create(
            &format!("error{request}"),
            &[
                ("streamtype", "error"),
                ("port", "8081"),
                ("requestid", request),
            ],
        )
        .await;
        let data = spdy
            .create(
                &format!("data{request}"),
                &[
                    ("streamtype", "data"),
                    ("port", "8081"),
                    ("requestid", request),
                ],
            )
            .await;
        spdy.data(data, b"GET /index.html HTTP/1.0\r\n\r\n", false)
            .await;
        let name = format!("data{request}");
        let got = spdy.collect_until(|o| o.finished.contains(&name)).await;
        let response = got.text(&name);
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response:?}");
        assert!(response.contains("spdy-forwarded"), "{response:?}");
    }
    // A port nothing listens on: the error stream says so.
    spdy.create(
        "error2",
        &[("streamtype", "error"), ("port", "9"), ("requestid", "2")],
    )
    .await;
    spdy.create(
        "data2",
        &[("streamtype", "data"), ("port", "9"), ("requestid", "2")],
    )
    .await;
    let got = spdy
        .collect_until(|o| o.finished.contains(&"error2".to_string()))
        .await;
    assert!(
        got.text("error2").contains("error forwarding port 9"),
        "{got:?}"
    );
    drop(spdy);
    rig.finish().await;
}

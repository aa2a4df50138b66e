//! A real HTTP server on loopback for the unit tests of the registry and
//! token service exchanges: it answers its connections one by one with
//! canned answers and hands back what it was sent.

use std::collections::BTreeMap;

use reqwest::Url;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().build().expect("HTTP client")
}

/// A canned answer: status, extra headers, body.
pub type Answer = (u16, Vec<(&'static str, String)>, String);

/// One request as the loopback token service received it.
#[derive(Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, Vec<String>>,
    pub headers: BTreeMap<String, String>,
    pub form: BTreeMap<String, String>,
}

fn decode_pairs(encoded: &str) -> Vec<(String, String)> {
    Url::parse(&format!("http://x/?{encoded}"))
        .expect("pairs")
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// A real HTTP server on loopback that answers its connections one by
/// one with `answers` (status, headers, body) and hands back what it
/// was sent.
pub struct Server {
    pub address: String,
    listener: TcpListener,
}

impl Server {
    pub async fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        Server { address, listener }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub fn serve(self, answers: Vec<Answer>) -> tokio::task::JoinHandle<Vec<Received>> {
        tokio::spawn(async move {
            let mut received = Vec::new();
            for (status, headers, body) in answers {
                let (mut stream, _) = self.listener.accept().await.expect("accept");
                let mut data = Vec::new();
                let mut buf = [0u8; 4096];
                let head_end = loop {
                    if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                    let n = stream.read(&mut buf).await.expect("read");
                    assert!(n > 0, "connection closed before the request head");
                    data.extend_from_slice(&buf[..n]);
                };
                let head = String::from_utf8_lossy(&data[..head_end]).to_string();
                let mut lines = head.lines();
                let mut request_line = lines.next().expect("request line").split(' ');
                let method = request_line.next().expect("method").to_string();
                let target = request_line.next().expect("target").to_string();
                let request_headers: BTreeMap<String, String> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
                    .collect();
                let length: usize = request_headers
                    .get("content-length")
                    .map_or(0, |l| l.parse().expect("content-length"));
                while data.len() < head_end + length {
                    let n = stream.read(&mut buf).await.expect("read body");
                    assert!(n > 0, "connection closed before the request body");
                    data.extend_from_slice(&buf[..n]);
                }
                let request_body = String::from_utf8_lossy(&data[head_end..]).to_string();
                let (path, query) = target.split_once('?').unwrap_or((&target, ""));
                let mut query_map: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for (k, v) in decode_pairs(query) {
                    query_map.entry(k).or_default().push(v);
                }
                received.push(Received {
                    method,
                    path: path.to_string(),
                    query: query_map,
                    headers: request_headers,
                    form: decode_pairs(&request_body).into_iter().collect(),
                });
                let mut response = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                for (name, value) in &headers {
                    response.push_str(&format!("{name}: {value}\r\n"));
                }
                response.push_str("\r\n");
                response.push_str(&body);
                stream.write_all(response.as_bytes()).await.expect("write");
                let _ = stream.shutdown().await;
            }
            received
        })
    }
}

pub fn answer(status: u16, body: &str) -> Answer {
    (status, Vec::new(), body.to_string())
}
